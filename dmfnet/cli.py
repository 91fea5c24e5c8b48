"""The one ``dmfnet`` entry point. Each command group lives with its concern and registers itself here:
``serve`` (app/cli.py), ``pacs`` (app/pacs/cli.py), ``fuse``/``info``/``eval``/``sample``/``export`` (models/cli.py),
``train`` (models/training/cli.py). Imports stay lazy, so ``--help`` is fast and the service never loads the
training code."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for all sub-commands."""
    from app.cli import add_parser as add_serve
    from app.pacs.cli import add_parser as add_pacs
    from models.cli import add_parsers as add_science
    from models.training.cli import add_parser as add_train

    p = argparse.ArgumentParser(prog="dmfnet", description="DM-FNet multimodal medical image fusion")
    sub = p.add_subparsers(dest="command", required=True)
    add_serve(sub)
    add_science(sub)
    add_pacs(sub)
    add_train(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = build_parser().parse_args(argv)
    from models.runtimes import RuntimeUnavailable
    from models.weights import WeightsError

    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, WeightsError, RuntimeUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
