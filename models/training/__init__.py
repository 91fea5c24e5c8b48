"""Training: Stage I diffusion UNet (stage1.py), Stage II fusion head (stage2.py)."""
