"""``dmfnet train stage1|stage2``: training from a run config (imports torch and the data code lazily)."""

from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from models.training.config import Stage1Config, Stage2Config, load_run_config

    try:
        load_run_config(args.config, Stage1Config if args.stage == "stage1" else Stage2Config)
    except ValidationError as exc:
        print(f"error: invalid {args.stage} config {args.config}:\n{exc}", file=sys.stderr)
        return 2
    from models.training.data import DataError

    try:
        if args.stage == "stage1":
            from models.training.stage1 import train_stage1

            cfg = load_run_config(args.config, Stage1Config)
            path = train_stage1(cfg, resume=args.resume, progress=not args.no_progress)
        else:
            from models.training.stage2 import train_stage2

            cfg = load_run_config(args.config, Stage2Config)
            path = train_stage2(cfg, resume=args.resume, progress=not args.no_progress)
    except DataError as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoint: {path}")
    return 0


def add_parser(sub) -> None:
    """Register ``train``."""
    t = sub.add_parser("train", help="train Stage I (UNet) or Stage II (fusion head) from a run config")
    t.add_argument("stage", choices=["stage1", "stage2"])
    t.add_argument("--config", required=True, help="YAML/JSON run configuration")
    t.add_argument("--resume", action="store_true", help="continue the run_dir's checkpoint bit-for-bit")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    t.set_defaults(func=run)
