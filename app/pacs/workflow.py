"""Fuse a study: retrieve both series, pair slices, window, fuse (service or in-process), store the derived series."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx
import numpy as np

from app.pacs import dicom_io
from app.pacs.config import PacsSettings
from app.pacs.series import SeriesInfo, SeriesRefused, check_partners
from app.pacs.transport import PacsError, Transport, retry
from models.imaging import DecodedImage, decode_image, encode_png
from models.pair_input import prepare_pair
from models.pipeline import Fuser as ModelFuser

log = logging.getLogger("dmfnet.pacs")


class Fuser(Protocol):
    """Fuses windowed slice pairs ([0, 1] arrays) into [0, 1] gray or RGB arrays."""

    weights_sha256: str
    model_name: str

    def fuse(self, mri: list[np.ndarray], func: list[np.ndarray], modality: str) -> list[np.ndarray]: ...  # noqa: D102


def _quantize(x: np.ndarray) -> np.ndarray:
    """The 8-bit image the service would receive as PNG (so both fusers see identical inputs)."""
    return np.round(np.clip(x, 0, 1) * 255).astype(np.float32) / 255


class InProcessFuser:
    """The model in this process (no service needed)."""

    def __init__(self, pipeline: ModelFuser, batch_size: int = 8) -> None:
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.weights_sha256 = str(pipeline.weights_sha256 or pipeline.weights_path)
        self.model_name = pipeline.model_name

    def fuse(self, mri: list[np.ndarray], func: list[np.ndarray], modality: str) -> list[np.ndarray]:  # noqa: D102
        pairs = [prepare_pair(DecodedImage(_quantize(m), 8), DecodedImage(_quantize(f), 8), modality)
                 for m, f in zip(mri, func, strict=True)]
        out = []
        for i in range(0, len(pairs), self.batch_size):
            out += [r.pixels for r in self.pipeline.fuse(pairs[i : i + self.batch_size])]
        return out


class ServiceFuser:
    """A running ``dmfnet serve``: slices go through ``/fuse/batch`` in batches, so the service batches them
    on its model (the PNG round trip is lossless at 8 bits)."""

    def __init__(self, settings: PacsSettings, client: httpx.Client | None = None) -> None:
        headers = {"X-API-Key": settings.service_api_key} if settings.service_api_key else {}
        self.client = client or httpx.Client(base_url=settings.service_url or "", headers=headers,
                                             timeout=settings.timeout_s)
        self.settings = settings
        version = retry(lambda: self.client.get("/version").raise_for_status().json(), settings,
                        (httpx.TransportError,), "service /version")
        self.weights_sha256 = str(version["model"]["weights_sha256"] or version["model"]["weights"])
        self.model_name = version["model"]["model"]

    def fuse(self, mri: list[np.ndarray], func: list[np.ndarray], modality: str) -> list[np.ndarray]:  # noqa: D102
        out: list[np.ndarray] = []
        step = self.settings.service_batch_size
        for i in range(0, len(mri), step):
            files = [("mri", (f"{j}.png", encode_png(m))) for j, m in enumerate(mri[i : i + step])]
            files += [("functional", (f"{j}.png", encode_png(f))) for j, f in enumerate(func[i : i + step])]
            out += retry(lambda files=files: self._post_batch(files, modality), self.settings,
                         (httpx.TransportError,), "service /fuse/batch")
        return out

    def _post_batch(self, files: list, modality: str) -> list[np.ndarray]:
        r = self.client.post("/fuse/batch", files=files, data={"modality": modality})
        if r.status_code >= 500:  # queue full, deadline, restart: worth another try
            raise httpx.TransportError(f"service answered {r.status_code}")
        if r.status_code != 200:
            raise PacsError(f"service refused the batch: {r.status_code} {r.text[:200]}")
        with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
            manifest = json.loads(zf.read("manifest.json"))["pairs"]
            bad = [e for e in manifest if e["status"] != 200]
            if any(e["status"] >= 500 for e in bad):
                raise httpx.TransportError(f"service could not fuse {len(bad)} slice(s) now")
            if bad:
                raise PacsError(f"service refused slice {bad[0]['index']}: {bad[0].get('detail')}")
            return [decode_image(zf.read(e["file"]), label="fused slice from the service").pixels
                    for e in sorted(manifest, key=lambda e: e["index"])]


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/dmfnet/pacs (or ~/.cache/dmfnet/pacs)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dmfnet" / "pacs"


class SliceCache:
    """Fused slices on disk until their series is stored, so a re-run after an outage fuses only what is missing.

    Keyed by both source SOP Instance UIDs, the weights checksum and the windowing; entries are removed once
    the series is stored (they are derived patient images: the folder is private to the user).
    """

    def __init__(self, root: Path | None) -> None:
        self.root = root
        if root is not None:
            try:
                root.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:  # an optimisation, not a reason to stop: fuse without it, and say so
                log.warning("slice cache disabled", extra={"reason": exc.strerror})
                self.root = None

    @staticmethod
    def key(*parts: str) -> str:
        """Cache key of one fused slice."""
        return hashlib.sha256("/".join(parts).encode()).hexdigest()

    def get(self, key: str) -> np.ndarray | None:
        """The cached slice, or None."""
        if self.root is None or not (self.root / f"{key}.npy").exists():
            return None
        try:
            return np.load(self.root / f"{key}.npy")
        except (OSError, ValueError):  # a torn write from a crash: recompute
            return None

    def put(self, key: str, pixels: np.ndarray) -> None:
        """Store atomically (write, then rename)."""
        if self.root is None:
            return
        tmp = self.root / f"{key}.tmp.npy"
        np.save(tmp, pixels)
        tmp.replace(self.root / f"{key}.npy")

    def drop(self, keys: list[str]) -> None:
        """Forget slices whose series is safely stored."""
        if self.root is None:
            return
        for key in keys:
            (self.root / f"{key}.npy").unlink(missing_ok=True)


@dataclass
class FusionReport:
    """What happened to one MR + partner pair of a study; printed as JSON by the CLI."""

    study: str
    series_uid: str
    status: str  # "stored" | "exists" | "refused" | "failed" | "mr_only" | "no_mr"
    instances: int
    partner: str = ""  # modality of the functional series
    reason: str = ""
    failed: list[str] = field(default_factory=list)


def _lookup(transport: Transport, series: str, role: str) -> SeriesInfo:
    info = transport.series_info(series)
    if info is None:
        raise PacsError(f"{role} series {series} not found in the PACS")
    return info


def fuse_study(transport: Transport, fuser: Fuser, study: str, mri_series: str, func_series: str,
               settings: PacsSettings | None = None, cache: SliceCache | None = None) -> FusionReport:
    """Fuse two co-registered series of a study and store the derived series in the same study.

    Before any pixels move, both series are looked up by UID and checked (:func:`check_partners`: same
    patient, study and frame of reference, MR + PT/NM/CT); a refusal raises :class:`SeriesRefused`.
    Idempotent: the output UIDs derive from the inputs and the weights, so a re-run finds the stored series
    and retrieves nothing. A partial store raises :class:`PacsError` naming the failed instances.
    """
    mr, func = _lookup(transport, mri_series, "MRI"), _lookup(transport, func_series, "functional")
    check_partners(study, mr, func)
    return _fuse_partners(transport, fuser, study, mr, func, transport.series_in_study(study),
                          settings or PacsSettings(), cache or SliceCache(None))


def _fuse_partners(transport: Transport, fuser: Fuser, study: str, mr_info: SeriesInfo, func_info: SeriesInfo,
                   series: list[SeriesInfo], settings: PacsSettings, cache: SliceCache) -> FusionReport:
    """Checked partners -> stored derived series (or "exists" without retrieving anything)."""
    series_uid = dicom_io.derived_series_uid(study, mr_info.uid, func_info.uid, fuser.weights_sha256)
    done = next((s for s in series if s.uid == series_uid), None)
    if done is not None and done.count >= mr_info.count > 0:
        return FusionReport(study, series_uid, "exists", done.count, func_info.modality)
    if mr_info.count and func_info.count and mr_info.count != func_info.count:  # known before any retrieval
        raise dicom_io.SeriesMismatch([f"slice count {mr_info.count} (MR) vs {func_info.count} (functional)"])
    mri = dicom_io.sort_series(transport.retrieve_series(study, mr_info.uid))
    func = dicom_io.sort_series(transport.retrieve_series(study, func_info.uid))
    dicom_io.check_pairing(mri, func)
    modality = dicom_io.functional_modality(func)
    window = (settings.functional_window, str(settings.suv_max))
    keys = [SliceCache.key(m.SOPInstanceUID, f.SOPInstanceUID, fuser.weights_sha256, *window)
            for m, f in zip(mri, func, strict=True)]
    fused: list[np.ndarray | None] = [cache.get(k) for k in keys]
    todo = [i for i, y in enumerate(fused) if y is None]
    if todo:
        mri_img = dicom_io.window_series(mri, "mri")
        func_img = dicom_io.window_series(func, "functional", settings.functional_window, settings.suv_max)
        step = max(1, settings.service_batch_size)
        for k in range(0, len(todo), step):  # cache as we go: an outage loses at most one batch of work
            part = todo[k : k + step]
            for i, y in zip(part, fuser.fuse([mri_img[i] for i in part], [func_img[i] for i in part], modality),
                            strict=True):
                fused[i] = y
                cache.put(keys[i], y)
    number = 9000 + int(series_uid.rsplit(".", 1)[-1][-3:]) % 1000  # stable, out of the scanner's usual range
    info = dicom_io.DerivedInfo(
        series_uid=series_uid, series_number=number,
        description=f"DM-FNet fusion MR + {func[0].Modality} - not for diagnosis",
        derivation=(f"DM-FNet fusion of MR series {mr_info.uid} and {func[0].Modality} series {func_info.uid}; "
                    f"model {fuser.model_name}, weights sha256 {fuser.weights_sha256}, functional window "
                    f"{settings.functional_window}. {dicom_io.NOT_FOR_DIAGNOSIS}"),
        software=f"dmfnet {__import__('models').__version__} {fuser.model_name}",
    )
    sop_uids = dicom_io.derived_instance_uids(series_uid, len(mri))
    out = [dicom_io.derived_dataset(m, f, y, uid, i, info)
           for i, (m, f, y, uid) in enumerate(zip(mri, func, fused, sop_uids, strict=True))]
    failed = transport.store(out)
    if failed:
        raise PacsError(f"{len(failed)} of {len(out)} fused instances were not stored (series {series_uid}); "
                        "re-run to complete it: fused slices are cached, only the store is repeated")
    cache.drop(keys)
    log.info("fused series stored", extra={"instances": len(out), "modality": modality, "reused": len(mri) - len(todo)})
    return FusionReport(study, series_uid, "stored", len(out), func_info.modality)


def watch_once(transport: Transport, fuser: Fuser, settings: PacsSettings,
               cache: SliceCache | None = None) -> list[FusionReport]:
    """One polling pass: every study's MR + each partner (PT, NM, CT per the rules) fused once.

    Decided from the series list alone: a pair whose derived series is already stored is reported as
    "exists" without retrieving anything. One log line per study and partner (study UID, partner, outcome,
    reason); refusals name the tag only.
    """
    cache = cache or SliceCache(None)
    rules = settings.watch
    reports = []
    for study in transport.studies():
        series = transport.series_in_study(study)
        mrs = [s for s in series if s.modality == "MR"
               and (rules.mri_description_contains is None or rules.mri_description_contains in s.description)]
        partners = [s for s in series if s.modality in rules.functional_modalities]
        if not mrs or not partners:
            status, reason = (("mr_only", "MR series but no PT/NM/CT partner to fuse") if mrs
                              else ("no_mr", "no MR series matching the rules"))
            reports.append(FusionReport(study, "", status, 0, reason=reason))
            log.info("study not fused", extra={"study": study, "outcome": status, "reason": reason})
            continue
        for partner in partners:
            try:
                check_partners(study, mrs[0], partner)
                report = _fuse_partners(transport, fuser, study, mrs[0], partner, series, settings, cache)
            except SeriesRefused as exc:
                report = FusionReport(study, "", "refused", 0, partner.modality, reason=f"{exc.tag} {exc.reason}")
            except (PacsError, dicom_io.SeriesMismatch) as exc:
                report = FusionReport(study, "", "failed", 0, partner.modality, reason=str(exc)[:300])
            reports.append(report)
            log.info("study fused" if report.status in ("stored", "exists") else "study not fused",
                     extra={"study": study, "partner": partner.modality, "outcome": report.status,
                            "reason": report.reason})
    return reports
