"""``dmfnet pacs listen``: the DICOM node a PACS or scanner pushes studies to (C-STORE), fused when stable and
sent back through the configured transport (C-STORE or STOW-RS), on the watcher's own study job.

Flow: an allowed AE associates (others are rejected at association) -> each instance is spooled durably before
its 0x0000 (models of it: app/pacs/spool.py) -> a study with no instance for ``stable_age_s``, no association
open on it and none cut short is a job -> :func:`app.pacs.watch.process_study` over a :class:`SpoolTransport`
(series choice, partner checks, geometry, fusion, derived series: the same code as ``watch``; the series list
and pixels come from the spool, whether the derived series exists already and the store go to the PACS) ->
stored or already there: the spooled study goes; refused (no MR, geometry, ...): reported once and moved to
failed/ or removed (``listen_failed_policy``); failed (the PACS or the service unreachable): kept and retried
with backoff until stored. Idempotent: the derived UIDs derive from the inputs and the weights, and the PACS
is asked first, so a study pushed twice or a restart in the middle gives one derived series.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset

from app.pacs.config import PacsSettings
from app.pacs.health import HealthServer
from app.pacs.series import SeriesInfo
from app.pacs.spool import OUT_OF_RESOURCES, Spool, SpoolFull
from app.pacs.transport import FUSED_STORAGE_CLASSES, Transport
from app.pacs.watch import Decisions, process_study
from app.pacs.workflow import FusionReport, SliceCache
from models.volumes.fusion import SliceFuser

log = logging.getLogger("dmfnet.pacs.listen")

ACCEPTED_CLASSES = FUSED_STORAGE_CLASSES[:-1]  # MR, CT, PET (classic and Enhanced), NM: what the reader reads
DONE = ("stored", "exists")
TERMINAL = ("refused", "no_mr", "mr_only")  # fused never, whatever is retried


def accepted_transfer_syntaxes() -> list[str]:
    """Every transfer syntax the volume reader decodes (pydicom with the pylibjpeg plugins)."""
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        RLELossless,
    )

    return [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
            RLELossless, JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEG2000Lossless]


class SpoolTransport:
    """What the watcher's study job asks of a PACS, over one spooled study: its series and pixels from the spool;
    the derived series already stored, and the store itself, from the destination."""

    def __init__(self, spool: Spool, folder: Path, destination: Transport) -> None:
        from models.volumes.io import parse_dicom

        self.spool, self.folder, self.destination, self._parse = spool, folder, destination, parse_dicom
        self.files: dict[str, list[Path]] = {}
        self.headers: dict[str, Dataset] = {}
        for path in spool.instances(folder):
            try:
                header = self._header(path)
            except Exception:  # noqa: BLE001 - a file the reader cannot parse is left out, and said so
                log.warning("spooled instance unreadable; left out", extra={"file": path.name})
                continue
            uid = str(header.get("SeriesInstanceUID", ""))
            self.files.setdefault(uid, []).append(path)
            self.headers.setdefault(uid, header)

    @staticmethod
    def _header(path: Path) -> Dataset:
        import pydicom

        return pydicom.dcmread(path, stop_before_pixels=True)

    def _info(self, uid: str) -> SeriesInfo:
        h = self.headers[uid]
        text = lambda name: str(h.get(name, "") or "")  # noqa: E731
        return SeriesInfo(uid, text("Modality"), text("SeriesDescription"), len(self.files[uid]), text("PatientID"),
                          text("IssuerOfPatientID"), text("StudyInstanceUID"), text("FrameOfReferenceUID"))

    def series_in_study(self, study: str) -> list[SeriesInfo]:  # noqa: D102
        mine = [self._info(uid) for uid in self.files]
        stored = [s for s in self.destination.series_in_study(study)
                  if s.uid not in self.files and s.modality not in ("MR", "CT", "PT", "NM")]
        return mine + stored  # derived series already in the PACS count (idempotence), other sources do not

    def series_info(self, series: str) -> SeriesInfo | None:  # noqa: D102
        return self._info(series) if series in self.files else None

    def image_type(self, study: str, series: str) -> list[str]:  # noqa: D102
        value = self.headers[series].get("ImageType") or []
        return [str(v) for v in (value if not isinstance(value, str) else [value])]

    def retrieve_series(self, study: str, series: str) -> list[Dataset]:  # noqa: D102
        return [self._parse(p) for p in self.files.get(series, [])]

    def store(self, datasets: list[Dataset]) -> list[str]:  # noqa: D102
        return self.destination.store(datasets)

    def echo(self) -> None:  # noqa: D102
        self.destination.echo()

    def studies(self, date_range: str | None = None, limit: int = 100):  # noqa: ANN201, D102
        return self.destination.studies(date_range, limit)


class ListenHealth:
    """The node's counters and gauges (Prometheus) and its /healthz and /readyz."""

    def __init__(self, spool: Spool, stale_after_s: float) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.spool, self.stale_after_s = spool, stale_after_s
        self.ready, self.last_loop = False, time.time()
        self.registry = r = CollectorRegistry()
        self.received = Counter("dmfnet_listen_instances_received_total", "instances spooled and acknowledged",
                                registry=r)
        self.rejected = Counter("dmfnet_listen_instances_rejected_total", "C-STOREs not acknowledged, by reason",
                                ["reason"], registry=r)
        self.studies = Counter("dmfnet_listen_studies_total", "study jobs by outcome", ["outcome"], registry=r)
        self.waiting = Gauge("dmfnet_listen_studies_waiting_to_send", "fused or fusible studies waiting for the "
                             "destination or the service", registry=r)
        self.pending = Gauge("dmfnet_listen_studies_pending", "studies in the spool", registry=r)
        self.incomplete = Gauge("dmfnet_listen_studies_incomplete", "studies an association cut short", registry=r)
        self.failed = Gauge("dmfnet_listen_studies_failed_kept", "refused studies kept in failed/", registry=r)
        self.bytes = Gauge("dmfnet_listen_spool_bytes", "bytes of spooled instances", registry=r)

    def refresh(self) -> None:
        """Gauges from the spool (each loop)."""
        self.last_loop = time.time()
        counts = self.spool.counts()
        self.pending.set(counts["pending"])
        self.incomplete.set(counts["incomplete"])
        self.failed.set(counts["failed_kept"])
        self.waiting.set(counts["waiting"])
        self.bytes.set(self.spool.bytes)

    def healthz(self) -> tuple[int, dict]:
        """503 when the study loop has not turned for ``stale_after_s`` (stuck)."""
        age = time.time() - self.last_loop
        return (200 if age <= self.stale_after_s else 503), {"loop_age_s": round(age, 1), "ready": self.ready}

    def readyz(self) -> tuple[int, dict]:
        """200 once the model is loaded and the node listens."""
        return (200 if self.ready else 503), {"status": "ready" if self.ready else "starting"}


def _patient_key(ds: Dataset) -> str:
    ident = f"{ds.get('PatientID', '')}|{ds.get('IssuerOfPatientID', '')}"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


class DicomNode:
    """The storage SCP (pynetdicom): allow-listed AEs and hosts, C-ECHO, C-STORE into the spool."""

    def __init__(self, settings: PacsSettings, spool: Spool, health: ListenHealth) -> None:
        self.settings, self.spool, self.health = settings, spool, health
        self.server = None
        self._ids: dict[int, str] = {}
        self._refused: set[str] = set()  # associations on which an instance was refused (out of resources)

    def _assoc_id(self, assoc) -> str:  # noqa: ANN001
        key = id(assoc)
        if key not in self._ids:
            self._ids[key] = uuid.uuid4().hex[:16]
            self.spool.live.add(self._ids[key])
        return self._ids[key]

    def _on_open(self, event) -> None:  # noqa: ANN001
        allowed = self.settings.listen_allowed_hosts
        if allowed and event.address[0] not in allowed:
            log.warning("association from a host not allowed; aborted", extra={"host": event.address[0]})
            event.assoc.abort()

    def _on_store(self, event) -> int:  # noqa: ANN001
        try:
            ds = event.dataset
            study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
            sop = str(event.request.AffectedSOPInstanceUID)
            raw = event.encoded_dataset(include_meta=True)
        except Exception:  # noqa: BLE001 - not an image we can place: refused, not spooled
            self.health.rejected.labels("unreadable").inc()
            return 0xC000
        assoc = self._assoc_id(event.assoc)
        try:
            self.spool.store(raw, study, series, sop, _patient_key(ds), assoc)
        except SpoolFull as exc:
            self.health.rejected.labels("out_of_resources").inc()
            log.warning("instance refused, spool full: the sender keeps it", extra={"why": str(exc)})
            self._hold(study, assoc)
            return OUT_OF_RESOURCES
        except ValueError:
            self.health.rejected.labels("patient_mismatch").inc()
            log.error("instance refused: its study holds another patient's instances")
            return 0xC001
        except OSError as exc:
            self.health.rejected.labels("out_of_resources").inc()
            log.error("instance refused, spool write failed: the sender keeps it", extra={"error": exc.strerror})
            self._hold(study, assoc)
            return OUT_OF_RESOURCES
        self.health.received.inc()
        return 0x0000

    def _hold(self, study: str, assoc: str) -> None:
        """Keep the study from being fused as if whole until the sender re-sends what was refused."""
        self._refused.add(assoc)
        try:
            self.spool.hold(study, assoc)
        except OSError:
            log.error("could not mark a study with refused instances (disk full?)")

    def _ended(self, normally: bool) -> Callable:
        def handler(event) -> None:  # noqa: ANN001
            assoc = self._ids.pop(id(event.assoc), None)
            if assoc is not None:
                self.spool.live.discard(assoc)
                refused = assoc in self._refused
                self._refused.discard(assoc)
                self.spool.association_ended(assoc, normally and not refused)
        return handler

    def start(self) -> None:
        """Listen (in pynetdicom's threads) on ``listen_port``."""
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.settings.listen_ae_title)
        ae.require_calling_aet = list(self.settings.listen_allowed_aets)
        ae.maximum_pdu_size = 0
        ae.add_supported_context(Verification)
        for sop_class in ACCEPTED_CLASSES:
            ae.add_supported_context(sop_class, accepted_transfer_syntaxes())
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: 0x0000),
                    (evt.EVT_CONN_OPEN, self._on_open), (evt.EVT_RELEASED, self._ended(True)),
                    (evt.EVT_ABORTED, self._ended(False)), (evt.EVT_CONN_CLOSE, self._ended(False))]
        self.server = ae.start_server(("0.0.0.0", self.settings.listen_port), block=False, evt_handlers=handlers)

    def stop(self) -> None:
        """Stop accepting; acknowledged instances are all on disk already."""
        if self.server is not None:
            self.server.shutdown()


def run_study(spool: Spool, folder: Path, destination: Transport, fuser: SliceFuser, settings: PacsSettings,
              cache: SliceCache, health: ListenHealth) -> list[FusionReport]:
    """One stable study through the watcher's job; the spool entry removed, failed or rescheduled."""
    state = spool.state(folder)
    transport = SpoolTransport(spool, folder, destination)
    reports = process_study(transport, fuser, state.study_uid, settings, cache, Decisions(None))
    if all(r.status in DONE for r in reports):
        spool.remove(folder)
        health.studies.labels("stored").inc()
    elif any(r.status == "failed" for r in reports):  # the PACS or the service: try again later, keep it all
        state.attempts += 1
        wait = min(settings.listen_retry_max_s, settings.backoff_s * 2 ** min(state.attempts, 20))
        state.next_attempt = time.time() + wait
        spool.update(state)
        health.studies.labels("retry").inc()
        log.warning("study kept for another attempt", extra={"attempt": state.attempts, "wait_s": round(wait, 1),
                                                             "reason": next(r.reason for r in reports
                                                                            if r.status == "failed")})
    else:
        reason = "; ".join(sorted({f"{r.status}: {r.reason}" for r in reports if r.status in TERMINAL}))
        spool.fail(folder, reason, keep=settings.listen_failed_policy == "keep")
        health.studies.labels("refused").inc()
    return reports


def listen_forever(settings: PacsSettings, destination: Transport, fuser: SliceFuser, cache: SliceCache,
                   stop: threading.Event, emit: Callable[[FusionReport], None],
                   on_ready: Callable[[int], None] | None = None) -> None:
    """Start the node and turn the study loop until ``stop``; the study in hand is finished first (an
    abandoned one stays in the spool, nothing acknowledged is lost)."""
    spool = Spool(settings.listen_spool_dir(), settings.listen_quota_mb * 2**20, settings.listen_min_free_mb * 2**20)
    health = ListenHealth(spool, settings.watch.stale_after_s)
    server = None
    if settings.listen_health_port is not None:
        server = HealthServer(health.registry, {"/healthz": health.healthz, "/readyz": health.readyz})
        server.serve(settings.listen_health_port)
    for folder in spool.incomplete():
        log.warning("study cut short by an earlier crash or abort: waits for the sender to re-send",
                    extra={"study": folder.name})
    node = DicomNode(settings, spool, health)
    node.start()
    health.ready = True
    if on_ready:
        on_ready(server.port if server else 0)
    log.info("listening", extra={"port": settings.listen_port, "ae_title": settings.listen_ae_title})
    try:
        while not stop.is_set():
            health.refresh()
            spool.expire(settings.listen_failed_retention_s, settings.listen_incomplete_retention_s)
            for folder in spool.ready(settings.stable_age_s):
                if stop.is_set():
                    break
                for report in run_study(spool, folder, destination, fuser, settings, cache, health):
                    emit(report)
            stop.wait(settings.listen_poll_s)
    finally:
        node.stop()
        health.ready = False


def report_line(report: FusionReport) -> str:
    """A report as the JSON line the CLI prints."""
    return json.dumps(dataclasses.asdict(report))
