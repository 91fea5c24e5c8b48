"""Write a Stage I checkpoint (the EMA UNet + its config) from a shipped weights file, so that a Stage II
fine-tune can start on a machine that has no ``runs/stage1_*`` checkpoint (the UNet is frozen in Stage II).

    python scripts/stage1_from_weights.py [weights/dmfnet_small.pt] [runs/stage1_v4/checkpoint.pt]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from models.inference.weights import load_weights


def main(weights: str = "weights/dmfnet_small.pt", out: str = "runs/stage1_v4/checkpoint.pt") -> None:
    """Save {model_config, ema, step, wall_s} as ``models.training.stage1.ema_unet`` reads it."""
    cfg, unet, _, meta = load_weights(weights)
    meta = json.loads(meta) if isinstance(meta, str) else meta
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_config": cfg.model_dump(mode="json"), "ema": unet.state_dict(),
                "step": meta.get("stage1_steps", 0), "wall_s": meta.get("stage1_wall_s", 0.0)}, out)
    print(f"wrote {out} (UNet of {weights}, Stage I step {meta.get('stage1_steps')})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
