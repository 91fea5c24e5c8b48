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
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named, never echoed: a mistyped option's value may be a secret
        names = sorted({u.split("=", 1)[0] for u in unknown if u.startswith("-")}) or ["(positional values)"]
        parser.print_usage(sys.stderr)
        print(f"dmfnet: error: unrecognized arguments: {' '.join(names)} (values not shown)", file=sys.stderr)
        return 2
    from models.inference.errors import RuntimeUnavailable, WeightsError

    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, WeightsError, RuntimeUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
