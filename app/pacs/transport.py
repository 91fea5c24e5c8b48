"""Two ways to talk to a PACS with one interface: DICOMweb (QIDO/WADO/STOW) and DIMSE (C-FIND/C-GET/C-STORE).

Both retry transient failures (connection errors, timeouts, HTTP 5xx, refused associations) with
exponential backoff. Nothing here logs patient data: only UIDs' counts and statuses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from pydicom.dataset import Dataset

from app.pacs.config import PacsSettings
from app.pacs.series import QUERY_KEYS, SeriesInfo

log = logging.getLogger("dmfnet.pacs")
retry_log = logging.getLogger("dmfnet.pacs.retry")  # the watcher quiets it during an outage it already reported
T = TypeVar("T")
# pynetdicom logs every C-FIND identifier it sends and receives at INFO (PatientID, names, ...): patient
# identifiers must never reach our logs, so only its warnings and errors pass.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class PacsError(RuntimeError):
    """A PACS operation failed (after retries where the failure looked transient). ``kind`` is a short stable
    label for metrics: unreachable, rejected, aborted, status, http."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


# DIMSE statuses a PACS answers with (PS3.4 C.4, PS3.7 C): named in every error so an admin knows what to fix.
STATUS_NAMES = {0xFE00: "cancelled: the PACS stopped the matching (often a cap on query results)",
                0xA700: "refused: out of resources", 0xA701: "refused: out of resources (matches)",
                0xA702: "refused: out of resources (sub-operations)", 0xA801: "refused: move destination unknown",
                0xA900: "identifier does not match SOP class", 0x0122: "SOP class not supported",
                0x0124: "refused: not authorised"}


def status_name(code: int) -> str:
    """'0xA700 (refused: out of resources)' for a DIMSE status code."""
    name = STATUS_NAMES.get(code) or ("unable to process" if 0xC000 <= code <= 0xCFFF else
                                      "failure" if 0xA000 <= code <= 0xAFFF else "")
    return f"0x{code:04X}" + (f" ({name})" if name else "")


def _status(status: Dataset | None, what: str) -> int:
    """The Status of a DIMSE response; an empty one means the PACS aborted the association (pynetdicom yields
    an empty Dataset then), which is what an unknown calling AE title usually gets."""
    if status is None:
        raise PacsError(f"{what}: no response (timeout)", "timeout")
    if "Status" not in status:
        raise PacsError(f"{what}: the PACS aborted the association (is the calling AE title registered with the "
                        "rights this needs?)", "aborted")
    return int(status.Status)


@dataclass
class StudyListing:
    """Study UIDs one query returned; ``capped`` when the PACS may have left some out."""

    uids: list[str]
    capped: bool


class Transport(Protocol):
    """What the fusion workflow needs from a PACS."""

    def echo(self) -> None: ...  # noqa: D102

    def series_in_study(self, study: str) -> list[SeriesInfo]: ...  # noqa: D102

    def series_info(self, series: str) -> SeriesInfo | None: ...  # noqa: D102 - looked up by its UID alone

    def studies(self, date_range: str | None = None, limit: int = 100) -> StudyListing: ...  # noqa: D102

    def image_type(self, study: str, series: str) -> list[str]: ...  # noqa: D102 - of one instance

    def retrieve_series(self, study: str, series: str) -> list[Dataset]: ...  # noqa: D102

    def store(self, datasets: list[Dataset]) -> list[str]: ...  # noqa: D102 - SOP UIDs that failed


def retry(fn: Callable[[], T], settings: PacsSettings, transient: tuple[type[BaseException], ...], what: str) -> T:
    """Call ``fn``; on a transient error wait and try again with exponential backoff.

    Waits ``backoff_s * 2^attempt`` (at most ``backoff_max_s``) up to ``settings.retries`` times, and never
    past ``settings.retry_total_s`` in all: a PACS restart (a minute or so) is ridden out, a dead PACS is not
    waited on for ever.
    """
    started = time.monotonic()
    for attempt in range(settings.retries + 1):
        try:
            return fn()
        except transient as exc:
            wait = min(settings.backoff_s * 2**attempt, settings.backoff_max_s)
            spent = time.monotonic() - started
            if attempt == settings.retries or spent + wait > settings.retry_total_s:
                raise PacsError(f"{what} failed after {attempt + 1} attempts in {spent:.0f} s: "
                                f"{type(exc).__name__}: {exc}", "unreachable") from exc
            log_retry = retry_log.warning if attempt == 0 else retry_log.debug  # one line per operation, not per try
            log_retry("transient PACS error, retrying", extra={
                "op": what, "attempt": attempt + 1, "wait_s": wait, "error": type(exc).__name__})
            time.sleep(wait)
    raise AssertionError("unreachable")


class _SeriesQueries:
    """Series lookups both transports share; each supplies ``_series(**filters)``, one series-level query."""

    def _series(self, **filters: str) -> list[SeriesInfo]:
        raise NotImplementedError

    def series_in_study(self, study: str) -> list[SeriesInfo]:
        """Series of a study (series-level metadata only)."""
        return self._series(StudyInstanceUID=study)

    def series_info(self, series: str) -> SeriesInfo | None:
        """One series looked up by its UID alone (which study and patient it belongs to is checked later)."""
        found = self._series(SeriesInstanceUID=series)
        return found[0] if found else None


# ---------------------------------------------------------------------------------------------- DICOMweb
class DicomWebTransport(_SeriesQueries):
    """QIDO-RS / WADO-RS / STOW-RS via dicomweb-client (requests session with auth)."""

    def __init__(self, settings: PacsSettings) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.settings = settings
        session = requests.Session()
        if settings.dicomweb_user:
            session.auth = (settings.dicomweb_user, settings.dicomweb_password or "")
        self.client = DICOMwebClient(url=settings.dicomweb_url, session=session, timeout=settings.timeout_s)
        self.client.set_http_retry_params(retry=False)  # one retry policy, ours (it also covers connection errors)
        self._transient = (requests.ConnectionError, requests.Timeout, _ServerError)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        import requests

        def guarded() -> T:
            try:
                return fn()
            except requests.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                if status >= 500:
                    raise _ServerError(f"HTTP {status}") from exc
                raise PacsError(f"{what}: HTTP {status}", "http") from exc

        return retry(guarded, self.settings, self._transient, what)

    def echo(self) -> None:
        """A QIDO query that must answer (DICOMweb has no C-ECHO)."""
        self._call("QIDO studies", lambda: self.client.search_for_studies(limit=1))

    def studies(self, date_range: str | None = None, limit: int = 100) -> StudyListing:
        """StudyInstanceUIDs (StudyDate in ``date_range``, DICOM range syntax), paged ``limit`` at a time.

        Some PACS cap an answer without saying so (Orthanc's LimitFindResults returns cap + 1 matches, and
        paging never reaches past them): an answer of ``limit`` or more is reported as possibly capped, so the
        caller narrows the query (``limit`` at or below the PACS's cap makes that reliable)."""
        filters = {"StudyDate": date_range} if date_range else {}
        uids: list[str] = []
        while True:
            page = self._call("QIDO studies", lambda offset=len(uids): self.client.search_for_studies(
                search_filters=filters, fields=["StudyInstanceUID"], limit=limit, offset=offset))
            new = [Dataset.from_json(s).StudyInstanceUID for s in page]
            uids += [u for u in new if u not in uids]
            if len(page) < limit or not new or len(uids) >= 100 * limit:  # (a PACS ignoring offset: stop)
                return StudyListing(uids, capped=len(uids) >= limit)

    def image_type(self, study: str, series: str) -> list[str]:
        """ImageType of one instance of the series (LOCALIZER, DERIVED ... are instance-level)."""
        found = self._call("QIDO instances", lambda: self.client.search_for_instances(
            study, series, fields=["00080008"], limit=1))
        return [str(v) for v in Dataset.from_json(found[0]).get("ImageType", [])] if found else []

    def _series(self, **filters: str) -> list[SeriesInfo]:
        found = self._call("QIDO series", lambda: self.client.search_for_series(
            search_filters=filters, fields=list(QUERY_KEYS)))
        return [SeriesInfo.from_dataset(Dataset.from_json(s)) for s in found]

    def retrieve_series(self, study: str, series: str) -> list[Dataset]:
        """All instances of a series (WADO-RS), in the transfer syntax they are stored in (decoded here)."""
        return self._call("WADO series", lambda: self.client.retrieve_series(
            study, series, media_types=(("application/dicom", "*"),)))

    def store(self, datasets: list[Dataset]) -> list[str]:
        """STOW-RS; returns the SOP Instance UIDs the PACS reported as failed."""
        resp = self._call("STOW", lambda: self.client.store_instances(datasets))
        failed = resp.get("00081198", {}).get("Value", []) if resp else []  # FailedSOPSequence
        return [Dataset.from_json(f).ReferencedSOPInstanceUID for f in failed]


class _ServerError(Exception):
    pass


# ---------------------------------------------------------------------------------------------- DIMSE
class DimseTransport(_SeriesQueries):
    """C-ECHO, C-FIND (study root), C-GET (retrieval on the same association) and C-STORE via pynetdicom."""

    def __init__(self, settings: PacsSettings) -> None:
        self.settings = settings

    def _associate(self, contexts: Callable, what: str, **kw):
        from pynetdicom import AE

        def connect():
            ae = AE(ae_title=self.settings.calling_aet)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout_s
            contexts(ae)
            assoc = ae.associate(self.settings.host, self.settings.port, ae_title=self.settings.called_aet, **kw)
            if assoc.is_rejected:  # permanent until someone changes the PACS or our settings: no retry
                rj = assoc.acceptor.primitive
                raise PacsError(f"{what}: association rejected by {self.settings.called_aet} ({rj.result_str}, "
                                f"{rj.source_str}: {rj.reason_str}); check called_aet and that calling AE "
                                f"{self.settings.calling_aet} is registered", "rejected")
            if not assoc.is_established:
                raise ConnectionError(f"association to {self.settings.called_aet} refused or failed")
            return assoc

        return retry(connect, self.settings, (ConnectionError, OSError), what)

    def echo(self) -> None:
        """C-ECHO."""
        from pynetdicom.sop_class import Verification

        assoc = self._associate(lambda ae: ae.add_requested_context(Verification), "C-ECHO")
        try:
            code = _status(assoc.send_c_echo(), "C-ECHO")
            if code != 0:
                raise PacsError(f"C-ECHO failed with status {status_name(code)}", "status")
        finally:
            assoc.release()

    def _find(self, query: Dataset, cancelled_ok: bool = False) -> tuple[list[Dataset], bool]:
        """(matches, cancelled): a PACS that caps its answers ends with 0xFE00 (Cancel) after the cap."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        assoc = self._associate(lambda ae: ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind),
                                "C-FIND")
        out, cancelled = [], False
        try:
            for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                code = _status(status, "C-FIND")
                if code in (0xFF00, 0xFF01) and ident is not None:
                    out.append(ident)
                elif code == 0xFE00 and cancelled_ok:
                    cancelled = True
                elif code != 0:
                    raise PacsError(f"C-FIND failed with status {status_name(code)}", "status")
        finally:
            assoc.release()
        return out, cancelled

    def studies(self, date_range: str | None = None, limit: int = 100) -> StudyListing:
        """StudyInstanceUIDs (StudyDate in ``date_range``); capped when the PACS cancelled or sent ``limit``+."""
        q = Dataset()
        q.QueryRetrieveLevel, q.StudyInstanceUID, q.StudyDate = "STUDY", "", date_range or ""
        found, cancelled = self._find(q, cancelled_ok=True)
        return StudyListing([str(d.StudyInstanceUID) for d in found], cancelled or len(found) >= limit)

    def image_type(self, study: str, series: str) -> list[str]:
        """ImageType of one instance of the series (C-FIND at IMAGE level)."""
        q = Dataset()
        q.QueryRetrieveLevel, q.StudyInstanceUID, q.SeriesInstanceUID = "IMAGE", study, series
        q.SOPInstanceUID, q.ImageType = "", ""
        found, _ = self._find(q, cancelled_ok=True)
        return [str(v) for v in found[0].get("ImageType", [])] if found else []

    def _series(self, **keys: str) -> list[SeriesInfo]:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        for name in QUERY_KEYS:
            setattr(q, name, keys.get(name, ""))
        return [SeriesInfo.from_dataset(d) for d in self._find(q)[0]]

    def retrieve_series(self, study: str, series: str) -> list[Dataset]:
        """C-GET of a series: the PACS sends the instances back over our association."""
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

        storage = storage_contexts()
        received: list[Dataset] = []

        def on_store(event) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            received.append(ds)
            return 0x0000

        def contexts(ae) -> None:
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
            for syntax, transfer in storage:
                ae.add_requested_context(syntax, transfer)

        roles = [build_role(syntax, scp_role=True) for syntax in dict.fromkeys(syntax for syntax, _ in storage)]
        assoc = self._associate(contexts, "C-GET", ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        q = Dataset()
        q.QueryRetrieveLevel, q.StudyInstanceUID, q.SeriesInstanceUID = "SERIES", study, series
        try:
            final = None
            for status, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
                final = _status(status, "C-GET")
            if final not in (0x0000, None):
                raise PacsError(f"C-GET finished with status {status_name(final)}", "status")
        finally:
            assoc.release()
        return received

    def store(self, datasets: list[Dataset]) -> list[str]:
        """C-STORE every instance on one association; returns the SOP Instance UIDs that failed."""
        classes = sorted({str(ds.SOPClassUID) for ds in datasets})

        def contexts(ae) -> None:
            for c in classes:
                ae.add_requested_context(c, [str(datasets[0].file_meta.TransferSyntaxUID)])

        assoc = self._associate(contexts, "C-STORE")
        failed = []
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                if not status or "Status" not in status or status.Status != 0:
                    failed.append(str(ds.SOPInstanceUID))
        finally:
            assoc.release()
        return failed


# Images we fuse, accepted in their stored (often compressed) transfer syntax: pydicom's pylibjpeg plugins
# decode JPEG, JPEG-LS, JPEG 2000 and RLE in-process, so the PACS need not transcode (and cannot get it wrong).
FUSED_STORAGE_CLASSES = ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1",  # MR, Enhanced MR
                         "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",  # CT, Enhanced CT
                         "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130",  # PET, Enhanced PET
                         "1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.7")  # NM, Secondary Capture


def storage_contexts() -> list[tuple[str, list[str]]]:
    """(SOP class, transfer syntaxes) proposed for C-GET: for the classes we fuse one presentation context per
    transfer syntax (so the PACS can send each instance as stored: with all syntaxes in one context it picks
    one for all, and transcodes), the uncompressed defaults for the rest (128 contexts at most; Q/R takes one)."""
    from pydicom.uid import (
        JPEG2000,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        RLELossless,
    )
    from pynetdicom import StoragePresentationContexts

    uncompressed = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                    ExplicitVRBigEndian]
    every = [*uncompressed, JPEGLSLossless, JPEGLSNearLossless, JPEGLosslessSV1, JPEGBaseline8Bit,
             JPEGExtended12Bit, JPEG2000Lossless, JPEG2000, RLELossless]
    out = [(c, [ts]) for c in FUSED_STORAGE_CLASSES for ts in every]
    others = [cx.abstract_syntax for cx in StoragePresentationContexts
              if cx.abstract_syntax not in FUSED_STORAGE_CLASSES]
    return out + [(c, uncompressed[:2]) for c in others[: 127 - len(out)]]


def make_transport(settings: PacsSettings) -> Transport:
    """The configured transport."""
    return DicomWebTransport(settings) if settings.transport == "dicomweb" else DimseTransport(settings)
