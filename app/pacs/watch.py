"""``dmfnet pacs watch``: a daemon a hospital can leave running.

A pass lists the studies of the date window (split into smaller windows while the PACS caps its answers),
then handles each study in its own error boundary, several at once (``watch.concurrency``): choose the MR
series (no localizers, no derived series, preferred descriptions, then most slices), fuse it with every
partner through :func:`app.pacs.workflow.fuse_partners`, one report line per pair whatever happens inside.
Refusals that only the pixels' headers reveal (geometry, registration) are remembered in a decisions file
keyed by series UIDs and instance counts, so a refused pair is not retrieved again until its series change.
:func:`watch_forever` never exits on an outage: it backs off up to ``watch.backoff_max_s`` and logs once per
state change.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from app.pacs.config import PacsSettings, WatchRules
from app.pacs.series import SeriesInfo, SeriesRefused
from app.pacs.transport import PacsError, Transport
from app.pacs.workflow import FusionReport, SliceCache, fuse_partners
from models.volumes.fusion import SliceFuser
from models.volumes.registration import RegistrationRefused
from models.volumes.volume import GeometryError

log = logging.getLogger("dmfnet.pacs")


class Decisions:
    """Refusals remembered across passes and restarts (a JSON file, written atomically)."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.lock = path, threading.Lock()
        self.data: dict[str, dict] = {}
        self.image_types: dict[str, list[str]] = {}  # series UID -> ImageType, for this process's lifetime
        if path is not None and path.exists():
            try:
                self.data = json.loads(path.read_text())
            except (OSError, ValueError):
                log.warning("decisions file unreadable; starting afresh", extra={"path": str(path)})

    @staticmethod
    def key(mr: SeriesInfo, partner: SeriesInfo, fuser: SliceFuser, settings: PacsSettings) -> str:
        """Changes when either series gains or loses instances, or the weights or registration setting change."""
        return "|".join((mr.uid, str(mr.count), partner.uid, str(partner.count), fuser.weights_sha256,
                         settings.registration))

    def get(self, key: str) -> dict | None:
        """The remembered decision, or None."""
        with self.lock:
            return self.data.get(key)

    def put(self, key: str, report: FusionReport) -> None:
        """Remember a refusal (and persist it)."""
        with self.lock:
            self.data[key] = {"status": report.status, "reason": report.reason, "at": time.time()}
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.data))
                tmp.replace(self.path)


def choose_series(transport: Transport, study: str, series: list[SeriesInfo], rules: WatchRules,
                  memo: dict[str, list[str]] | None = None) -> tuple[list[SeriesInfo], list[SeriesInfo], list[str]]:
    """(MR series to fuse, partner series, one note per skipped MR series); ``memo`` keeps each series'
    ImageType so later passes ask the PACS nothing."""
    memo = {} if memo is None else memo
    notes, candidates = [], []
    for s in (s for s in series if s.modality == "MR"):
        if rules.mri_description_contains and rules.mri_description_contains not in s.description:
            notes.append(f"{s.uid}: description does not contain {rules.mri_description_contains!r}")
        elif rules.mri_exclude and re.search(rules.mri_exclude, s.description, re.IGNORECASE):
            notes.append(f"{s.uid}: excluded by mri_exclude")
        elif s.count and s.count < rules.min_mr_slices:
            notes.append(f"{s.uid}: {s.count} images (localizer/scout?), fewer than min_mr_slices")
        else:
            candidates.append(s)
    kept = []
    for s in candidates:
        if s.uid not in memo:
            memo[s.uid] = [t.upper() for t in transport.image_type(study, s.uid)]
        image_type = memo[s.uid]
        if "LOCALIZER" in image_type:
            notes.append(f"{s.uid}: localizer (ImageType)")
        elif image_type[:1] == ["DERIVED"]:
            notes.append(f"{s.uid}: derived series (ImageType DERIVED)")
        else:
            kept.append(s)

    def preference(s: SeriesInfo) -> tuple:
        ranks = [i for i, pat in enumerate(rules.mri_prefer) if re.search(pat, s.description, re.IGNORECASE)]
        return (min(ranks) if ranks else len(rules.mri_prefer), -s.count, s.uid)

    kept.sort(key=preference)
    partners = [s for s in series if s.modality in rules.functional_modalities]
    return kept[: rules.max_mr_series], partners, notes


def _failure(study: str, partner: str, exc: BaseException) -> FusionReport:
    """Any exception as a report line: refusals are 'refused', everything else 'failed' (with its type)."""
    if isinstance(exc, SeriesRefused):
        return FusionReport(study, "", "refused", 0, partner, reason=f"{exc.tag} {exc.reason}", kind=exc.tag)
    if isinstance(exc, RegistrationRefused):
        return FusionReport(study, "", "refused", 0, partner, reason=str(exc)[:300], kind="registration")
    if isinstance(exc, GeometryError):
        return FusionReport(study, "", "refused", 0, partner, reason=str(exc)[:300], kind="geometry")
    if isinstance(exc, PacsError):
        return FusionReport(study, "", "failed", 0, partner, reason=str(exc)[:300], kind=f"pacs_{exc.kind}")
    return FusionReport(study, "", "failed", 0, partner, reason=f"{type(exc).__name__}: {exc}"[:300],
                        kind="unexpected")


def process_study(transport: Transport, fuser: SliceFuser, study: str, settings: PacsSettings, cache: SliceCache,
                  decisions: Decisions) -> list[FusionReport]:
    """Every MR + partner pair of one study, each in its own error boundary; never raises."""
    try:
        series = transport.series_in_study(study)
        mrs, partners, notes = choose_series(transport, study, series, settings.watch, decisions.image_types)
    except Exception as exc:  # noqa: BLE001 - one study must never stop the pass
        return [_failure(study, "", exc)]
    if not mrs or not partners:
        status, reason = (("mr_only", "MR series but no PT/NM/CT partner to fuse") if mrs
                          else ("no_mr", "no MR series matching the rules" + (f" ({'; '.join(notes)})" if notes
                                                                             else "")))
        return [FusionReport(study, "", status, 0, reason=reason[:300])]
    reports = []
    for mr in mrs:
        for partner in partners:
            key = Decisions.key(mr, partner, fuser, settings)
            remembered = decisions.get(key)
            if remembered is not None:
                reports.append(FusionReport(study, "", remembered["status"], 0, partner.modality,
                                            reason=remembered["reason"], kind="remembered"))
                continue
            try:
                report = fuse_partners(transport, fuser, study, mr, partner, series, settings, cache)
            except Exception as exc:  # noqa: BLE001 - any failure is this pair's line, not the pass's end
                report = _failure(study, partner.modality, exc)
                if isinstance(exc, GeometryError):  # only the headers of retrieved pixels revealed it
                    decisions.put(key, report)
            report.mr_series = mr.uid
            reports.append(report)
    return reports


def list_studies(transport: Transport, rules: WatchRules, today: dt.date | None = None) -> tuple[list[str], list[str]]:
    """(study UIDs of the window, problems): an answer of ``page_size`` or more may be capped, so it is split
    into smaller date windows until each answers fewer; a single day that still does is a problem line (its
    paged answer is used), never a silent partial listing."""
    today = today or dt.date.today()
    start = _since(rules.since, today)
    found: list[str] = []
    problems: list[str] = []
    first = transport.studies(f"{start:%Y%m%d}-" if start else None, rules.page_size)
    if not first.capped:
        return first.uids, problems
    windows: list[tuple[dt.date, dt.date | None]] = [(start or dt.date(1900, 1, 1), None)]  # None: open end
    while windows:
        lo, hi = windows.pop()
        listing = transport.studies(f"{lo:%Y%m%d}-{hi:%Y%m%d}" if hi else f"{lo:%Y%m%d}-", rules.page_size)
        found += [u for u in listing.uids if u not in found]
        if not listing.capped:
            continue
        if hi is None:  # up to today, then the future in yearly steps (a study dated ahead of the clock)
            end = max(lo, today)
            windows += [(end + dt.timedelta(days=1), None), (lo, end)] if lo <= today else [
                (lo + dt.timedelta(days=366), None), (lo, lo + dt.timedelta(days=365))]
        elif lo == hi:
            problems.append(f"{lo:%Y-%m-%d} alone answered {len(listing.uids)} studies, at least page_size "
                            f"({rules.page_size}): if the PACS caps its answers, some were not listed")
        else:
            mid = lo + (hi - lo) / 2
            windows += [(mid + dt.timedelta(days=1), hi), (lo, mid)]
    return found, problems


def _since(since: str | None, today: dt.date) -> dt.date | None:
    """``watch.since``: YYYYMMDD, YYYY-MM-DD or a number of days back ('7d')."""
    if not since:
        return None
    if m := re.fullmatch(r"(\d+)d", since.strip()):
        return today - dt.timedelta(days=int(m.group(1)))
    return dt.datetime.strptime(since.replace("-", ""), "%Y%m%d").date()


def watch_once(transport: Transport, fuser: SliceFuser, settings: PacsSettings, cache: SliceCache | None = None,
               decisions: Decisions | None = None,
               emit: Callable[[FusionReport], None] | None = None) -> list[FusionReport]:
    """One pass over the studies of the window (``watch.concurrency`` at a time); a listing that fails raises
    :class:`PacsError` (the caller backs off), anything inside a study is that study's report line."""
    cache, decisions = cache or SliceCache(None), decisions or Decisions(None)
    uids, problems = list_studies(transport, settings.watch)
    reports = [FusionReport("", "", "failed", 0, reason=p, kind="listing_capped") for p in problems]

    def one(study: str) -> list[FusionReport]:
        out = process_study(transport, fuser, study, settings, cache, decisions)
        for r in out:
            log.info("study fused" if r.status in ("stored", "exists") else "study not fused",
                     extra={"study": study, "partner": r.partner, "outcome": r.status, "reason": r.reason})
            if emit:
                emit(r)
        return out

    for r in reports:
        log.error("study listing incomplete", extra={"reason": r.reason})
        if emit:
            emit(r)
    with ThreadPoolExecutor(max_workers=max(1, settings.watch.concurrency), thread_name_prefix="watch") as pool:
        for out in pool.map(one, uids):
            reports += out
    return reports


def watch_forever(transport: Transport, fuser: SliceFuser, settings: PacsSettings, cache: SliceCache,
                  decisions: Decisions, emit: Callable[[FusionReport], None], stop: threading.Event,
                  health=None) -> None:
    """Pass after pass until ``stop`` is set; an outage (PACS or service) backs off, never ends the loop."""
    rules, wait, state = settings.watch, settings.watch.interval_s, "starting"
    while not stop.is_set():
        started = time.monotonic()
        try:
            reports = watch_once(transport, fuser, settings, cache, decisions, emit)
            new_state, wait = "ok", rules.interval_s
            if health:
                health.pass_done(reports, time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - the daemon outlives every outage
            kind = getattr(exc, "kind", type(exc).__name__)
            new_state, wait = f"error: {kind}", min(rules.backoff_max_s, max(rules.interval_s, wait * 2))
            if health:
                health.pass_failed(kind)
            if new_state != state:
                log.error("watch pass failed; backing off", extra={"error": str(exc)[:300], "wait_s": wait})
        if new_state != state:
            if new_state == "ok":
                log.info("watch pass succeeded", extra={"previous": state})
            # once an outage is reported, its retries are not (one line per state change, not per attempt)
            logging.getLogger("dmfnet.pacs.retry").setLevel(logging.NOTSET if new_state == "ok" else logging.ERROR)
            state = new_state
        stop.wait(wait)
