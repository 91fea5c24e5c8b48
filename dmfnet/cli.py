"""The one ``dmfnet`` entry point. Each command group lives with its concern and registers itself here:
``serve`` (app/cli.py), ``pacs`` (app/pacs/cli.py), ``fuse``/``info``/``eval``/``sample``/``export`` (models/cli.py),
``train`` (models/training/cli.py). Imports stay lazy, so ``--help`` is fast and the service never loads the
training code."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

# Which group registers each command: only that group's module is imported to run it (``dmfnet fuse`` need not
# import the service's settings), every group for ``dmfnet --help`` or an unknown command.
GROUPS = {"serve": ("app.cli", "add_parser"), "pacs": ("app.pacs.cli", "add_parser"),
          "train": ("models.training.cli", "add_parser"),
          **{c: ("models.cli", "add_parsers") for c in ("sample", "fuse", "info", "eval", "export")}}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Argument parser for ``command``'s group, or for all sub-commands (None or not a command)."""
    import importlib

    p = argparse.ArgumentParser(prog="dmfnet", description="DM-FNet multimodal medical image fusion")
    sub = p.add_subparsers(dest="command", required=True)
    wanted = [GROUPS[command]] if command in GROUPS else list(dict.fromkeys(GROUPS.values()))
    for module, function in wanted:
        getattr(importlib.import_module(module), function)(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
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


def run() -> NoReturn:
    """The shell's entry (console script and ``python -m dmfnet``): :func:`main`, then exit with its code.

    ``fuse``, ``eval``, ``train`` and ``pacs fuse-study`` first have glibc keep freed memory for reuse
    (:func:`models.inference.hardware.keep_freed_memory`: DM-FNet ~25% faster here).

    A ``fuse`` run has written, closed and printed everything when main returns; what is left is the
    interpreter's teardown, which for torch alone is 0.2-0.45 s of a 2.5-3 s study on the 2-core Xeon (freeing every
    module's objects). So it ends there with ``os._exit``, after flushing logs and stdio, unless something would
    still need that teardown: a child process or a non-daemon thread still alive.
    """
    if ends_when_done(sys.argv[1:]):
        from models.inference.hardware import keep_freed_memory

        keep_freed_memory()
    code = main()
    if (sys.argv[1:2] == ["fuse"]) and _nothing_left_to_finish():
        import logging
        import os

        logging.shutdown()
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:  # a closed pipe: let the normal exit report it
            sys.exit(code)
        os._exit(code)
    sys.exit(code)


def ends_when_done(argv: list[str]) -> bool:
    """Batch work that ends when done (``fuse``, ``eval``, ``train``, ``pacs ... fuse-study``), not a service or
    a daemon (``serve``, ``pacs listen``/``watch``): the commands that keep freed memory for reuse."""
    return argv[:1] in (["fuse"], ["eval"], ["train"]) or (argv[:1] == ["pacs"] and "fuse-study" in argv)


def _nothing_left_to_finish() -> bool:
    """No live child process and no thread but the main one and daemons."""
    import multiprocessing
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    return not others and not multiprocessing.active_children()


if __name__ == "__main__":
    run()
