"""``dmfnet serve``: the REST service. Its flags are generated from :class:`ServiceSettings`, so every setting
is a flag, with the same name, type, choices and help, and none is repeated here by hand."""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path

SECRET_FIELDS = {"api_key"}  # never a flag: command lines are visible to every user of the machine (ps)


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from app.settings import ServiceSettings

    overrides = {k: v for k, v in vars(args).items() if k in ServiceSettings.model_fields and v is not None}
    try:
        settings = ServiceSettings(**overrides)
    except ValidationError as exc:
        print(f"error: invalid service configuration (flags or DMFNET_* environment):\n{exc}", file=sys.stderr)
        return 2
    from app.http.main import create_app, drain
    from app.http.server import ConnectionLimits
    from app.http.shutdown import run
    from app.logs import configure_logging

    configure_logging(settings.log_json, settings.log_level)
    app = create_app(settings)
    run(app, settings.host, settings.port, settings.log_level,
        ConnectionLimits(settings.max_connections, settings.header_timeout_s, settings.body_timeout_s,
                         settings.min_body_rate),
        drain=lambda: drain(app.state.service))
    return 0


def _flag_kwargs(annotation: object) -> dict:
    """argparse keywords for a settings field's type (Optional[X] -> X; Literal -> choices; bool -> --x/--no-x)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float, Path):
        return {"type": annotation}
    return {"type": str}


class _RefuseSecret(argparse.Action):
    """``--api-key VALUE`` is refused without echoing VALUE (argparse would print it as unrecognised)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: D102
        parser.error("the API key is never a flag (command lines are visible to every user, e.g. in ps): set "
                     "DMFNET_API_KEY_FILE (or DMFNET_API_KEY), or --api-key-file PATH")


def add_parser(sub) -> None:
    """Register ``serve`` with one flag per service setting (flags override DMFNET_* environment variables)."""
    from app.settings import ServiceSettings

    s = sub.add_parser("serve", help="run the REST service (flags override DMFNET_* environment variables)",
                       allow_abbrev=False)  # `--api-key X` must never be read as `--api-key-file X`
    s.add_argument("--api-key", nargs="?", action=_RefuseSecret, help=argparse.SUPPRESS)
    for name, field in ServiceSettings.model_fields.items():
        if name in SECRET_FIELDS:
            continue
        default = "" if field.default is None else f" (default {field.default})"
        s.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                       help=f"{field.description or name}{default}; env DMFNET_{name.upper()}",
                       **_flag_kwargs(field.annotation))
    s.set_defaults(func=_serve)


def main(argv: list[str] | None = None) -> int:
    """``python -m app.cli serve ...`` still works (the service alone; ``dmfnet`` composes every command and
    imports this module, never the other way round)."""
    parser = argparse.ArgumentParser(prog="python -m app.cli", description="DM-FNet service (see also: dmfnet)")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
