"""What the networks are: the SR3 UNet, the fusion head, the fast student, the diffusion schedule, the hybrid
loss and the model configurations. Imports nothing else of the project's (torch and pydantic only)."""
