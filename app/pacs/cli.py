"""``dmfnet pacs echo | fuse-study | watch | listen``: the commands a hospital's imaging IT runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def add_parser(sub) -> None:
    """Register the ``pacs`` sub-command."""
    p = sub.add_parser("pacs", help="PACS integration: fuse series of a study and store the result back")
    p.add_argument("--config", help="PACS settings YAML (see README); DMFNET_PACS_* variables also apply")
    p.add_argument("--transport", choices=["dicomweb", "dimse"], help="override the configured transport")
    p.add_argument("--service-url", help="fuse through this running service (default: in-process model)")
    p.add_argument("--weights", help="in-process weights: full (default), fast, a file or random:CONFIG")
    p.add_argument("--log-json", action="store_true", help="log lines as JSON (default: key=value)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--register", choices=["none", "rigid"],
                   help="series in different Frames of Reference: refuse (none, default) or register rigidly")
    p.add_argument("--functional-frame", type=_frame, metavar="N|last",
                   help="4-D functional series (dynamic PET): fuse time point N (0-based) or the last; default: refuse")
    ps = p.add_subparsers(dest="pacs_command", required=True)
    ps.add_parser("echo", help="check the PACS answers (C-ECHO or a QIDO query)")
    f = ps.add_parser("fuse-study", help="fuse an MRI series with a CT/PET/SPECT series of one study")
    f.add_argument("--study", required=True, help="StudyInstanceUID")
    f.add_argument("--mri-series", required=True, help="SeriesInstanceUID of the MRI")
    f.add_argument("--functional-series", required=True, help="SeriesInstanceUID of the CT/PET/SPECT")
    w = ps.add_parser("watch", help="poll for studies matching the rules and fuse them")
    w.add_argument("--once", action="store_true", help="one pass, then exit (1 if a pair failed)")
    ps.add_parser("listen", help="a DICOM node: receive pushed studies (C-STORE), fuse them when stable, send the "
                  "derived series back (listen_* keys of the PACS settings)")
    p.set_defaults(func=run)


def _frame(text: str) -> int | str:
    return "last" if text == "last" else int(text)


def _listen(settings, transport, fuser, cache) -> int:
    """``listen``: the DICOM node in the foreground until SIGTERM (the study in hand is finished first)."""
    import signal
    import threading

    from app.pacs.listen import listen_forever, report_line

    if not settings.listen_allowed_aets:
        print("error: listen_allowed_aets is empty: name the calling AE titles that may push studies "
              "(DMFNET_PACS_LISTEN_ALLOWED_AETS='[\"ORTHANC\"]')", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def ready(health_port: int) -> None:
        print(f"listening as {settings.listen_ae_title} on :{settings.listen_port}"
              + (f", health on :{health_port}" if health_port else ""), file=sys.stderr, flush=True)

    try:
        listen_forever(settings, transport, fuser, cache, stop, lambda r: print(report_line(r), flush=True), ready)
    except KeyboardInterrupt:
        pass
    return 0


def _fuser(settings, weights: str | None):
    from app.pacs.workflow import InProcessFuser, ServiceFuser

    if settings.service_url:
        return ServiceFuser(settings)
    from models.inference.weights import open_pipeline

    return InProcessFuser(open_pipeline(weights or settings.weights))


def _watch(args: argparse.Namespace, settings, transport, fuser, cache) -> int:
    """``watch``: one pass (``--once``: exit 1 when a pair failed or the listing was incomplete) or for ever."""
    import signal
    import threading

    from app.pacs.config import default_cache_dir
    from app.pacs.health import WatchHealth
    from app.pacs.watch import Decisions, watch_forever, watch_once

    decisions = Decisions(settings.watch.decisions_file or (settings.cache_dir or default_cache_dir())
                          / "decisions.json")

    def emit(report) -> None:
        print(json.dumps(dataclasses.asdict(report)), flush=True)

    if args.once:
        reports = watch_once(transport, fuser, settings, cache, decisions, emit)
        return 1 if any(r.status == "failed" for r in reports) else 0
    health = WatchHealth(settings.watch.stale_after_s)
    if settings.watch.health_port is not None:
        server = health.serve(settings.watch.health_port)
        print(f"watch health on :{server.server_port}/healthz and /metrics", file=sys.stderr, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        watch_forever(transport, fuser, settings, cache, decisions, emit, stop, health)
    except KeyboardInterrupt:
        pass
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``dmfnet pacs``."""
    import logging

    from pydantic import ValidationError

    from app.logs import configure_logging
    from app.pacs.config import default_cache_dir, load_pacs_settings
    from app.pacs.series import SeriesRefused
    from app.pacs.transport import PacsError, make_transport
    from app.pacs.workflow import SliceCache, fuse_study
    from models.volumes.registration import RegistrationRefused
    from models.volumes.volume import GeometryError

    # one log line per study and partner (stderr); stdout keeps the JSON report lines
    configure_logging(args.log_json, args.log_level, names=("dmfnet",), propagate=True)
    try:
        settings = load_pacs_settings(args.config, transport=args.transport, service_url=args.service_url,
                                      registration=args.register, functional_frame=args.functional_frame)
    except (ValidationError, OSError) as exc:
        print(f"error: invalid PACS settings: {exc}", file=sys.stderr)
        return 2
    transport = make_transport(settings)
    try:
        if args.pacs_command == "echo":
            transport.echo()
            print(f"PACS answered ({settings.transport})")
            return 0
        fuser = _fuser(settings, args.weights)
        cache = SliceCache(settings.cache_dir or default_cache_dir())
        if args.pacs_command == "fuse-study":
            report = fuse_study(transport, fuser, args.study, args.mri_series, args.functional_series, settings,
                                cache)
            print(json.dumps(dataclasses.asdict(report)))
            return 0
        if args.pacs_command == "listen":
            return _listen(settings, transport, fuser, cache)
        return _watch(args, settings, transport, fuser, cache)
    except SeriesRefused as exc:
        # The operator sees both values (they chose the series); the log gets the tag name only.
        logging.getLogger("dmfnet.pacs").error("series refused", extra={"tag": exc.tag})
        print(json.dumps({"error": "series_refused", "tag": exc.tag, "reason": exc.reason,
                          "mri_series_value": exc.mri_value, "functional_series_value": exc.functional_value}),
              file=sys.stderr)
        return 1
    except RegistrationRefused as exc:
        print(json.dumps({"error": "registration_refused", "problem": str(exc)}), file=sys.stderr)
        return 1
    except GeometryError as exc:
        print(json.dumps({"error": "geometry_refused", "problem": str(exc)}), file=sys.stderr)
        return 1
    except PacsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
