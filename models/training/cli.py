"""``dmfnet train stage1|stage2|distill``: training from a run config (imports torch and the data code lazily)."""

from __future__ import annotations

import argparse
import importlib
import sys

# stage -> (config class, module, training function)
STAGES = {
    "stage1": ("Stage1Config", "models.training.stage1", "train_stage1"),
    "stage2": ("Stage2Config", "models.training.stage2", "train_stage2"),
    "distill": ("DistillConfig", "models.training.distill", "train_distill"),
}


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from models.training import config

    cls_name, module, func = STAGES[args.stage]
    try:
        cfg = config.load_run_config(args.config, getattr(config, cls_name))
    except ValidationError as exc:
        print(f"error: invalid {args.stage} config {args.config}:\n{exc}", file=sys.stderr)
        return 2
    from models.training.data import DataError

    try:
        if args.export_head:
            if args.stage != "stage2":
                print("error: --export-head applies to stage2 runs", file=sys.stderr)
                return 2
            from models.training.stage2 import export_checkpoint_head

            path = export_checkpoint_head(cfg, args.from_checkpoint, args.export_head)
            print(f"weights: {path}")
            return 0
        path = getattr(importlib.import_module(module), func)(cfg, resume=args.resume, progress=not args.no_progress)
    except DataError as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoint: {path}")
    return 0


def add_parser(sub) -> None:
    """Register ``train``."""
    t = sub.add_parser("train", help="train Stage I (UNet), Stage II (fusion head) or the distilled fast tier")
    t.add_argument("stage", choices=list(STAGES))
    t.add_argument("--config", required=True, help="YAML/JSON run configuration")
    t.add_argument("--resume", action="store_true", help="continue the run_dir's checkpoint bit-for-bit")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    t.add_argument("--export-head", metavar="OUT", help="stage2: write the head of a checkpoint (the run's latest, "
                   "or --from-checkpoint) as a weights file OUT instead of training")
    t.add_argument("--from-checkpoint", metavar="PT", help="with --export-head: a copy of a run checkpoint")
    t.set_defaults(func=run)
