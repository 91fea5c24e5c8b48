"""Fuse a study: retrieve both series as volumes, place them in one patient space (same Frame of Reference, or an
opt-in rigid registration), fuse along the MR's slices (service or in-process), store the derived series."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from app.pacs.config import PacsSettings
from app.pacs.series import SeriesInfo, check_partners
from app.pacs.transport import PacsError, Transport, retry
from models.images.imaging import decode_image, encode_png
from models.volumes import dicom
from models.volumes.fusion import InProcessFuser, SliceFuser, fuse_volumes, fused_count
from models.volumes.io import volume_from_datasets
from models.volumes.registration import Registration, RegistrationLimits, register_rigid
from models.volumes.volume import Volume, different_frames

log = logging.getLogger("dmfnet.pacs")
__all__ = ["InProcessFuser", "ServiceFuser", "SliceCache", "FusionReport", "fuse_partners", "fuse_study"]


class ServiceFuser:
    """A running ``dmfnet serve``: slices go through ``/fuse/batch`` in batches, so the service batches them
    on its model (the PNG round trip is lossless at 8 bits)."""

    def __init__(self, settings: PacsSettings, client: httpx.Client | None = None) -> None:
        headers = {"X-API-Key": settings.service_api_key} if settings.service_api_key else {}
        self.client = client or httpx.Client(base_url=settings.service_url or "", headers=headers,
                                             timeout=settings.timeout_s)
        self.settings = settings
        self._version: dict | None = None

    def _model(self) -> dict:
        """The service's model description, asked for on first use (a watcher may start before the service)."""
        if self._version is None:
            self._version = retry(lambda: self.client.get("/version").raise_for_status().json()["model"],
                                  self.settings, (httpx.TransportError, httpx.HTTPStatusError), "service /version")
        return self._version

    @property
    def weights_sha256(self) -> str:
        """Checksum of the weights the service fuses with (part of every derived UID)."""
        model = self._model()
        return str(model["weights_sha256"] or model["weights"])

    @property
    def model_name(self) -> str:
        """dmfnet-small or dmfnet-fast."""
        return self._model()["model"]

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
    fused_range: str = ""  # "slices 9-32 of 40": the MR slices the functional volume covers
    registration: str = ""  # the transform and final metric, when the series were registered
    kind: str = ""  # a short stable label of why it was refused or failed (metrics)
    mr_series: str = ""


def _lookup(transport: Transport, series: str, role: str) -> SeriesInfo:
    info = transport.series_info(series)
    if info is None:
        raise PacsError(f"{role} series {series} not found in the PACS")
    return info


def fuse_study(transport: Transport, fuser: SliceFuser, study: str, mri_series: str, func_series: str,
               settings: PacsSettings | None = None, cache: SliceCache | None = None) -> FusionReport:
    """Fuse a functional series onto an MR series of a study and store the derived series in the same study.

    Before any pixels move, both series are looked up by UID and checked (:func:`check_partners`: same
    patient and study, same Frame of Reference unless ``register: rigid``, MR + PT/NM/CT); a refusal raises
    :class:`SeriesRefused`. Geometry problems (no overlap, irregular series) and implausible registrations
    raise :class:`GeometryError` and store nothing. Idempotent: the output UIDs derive from the inputs and the
    weights, so a re-run finds the stored series and retrieves nothing. A partial store raises
    :class:`PacsError` naming the failed instances.
    """
    settings = settings or PacsSettings()
    mr, func = _lookup(transport, mri_series, "MRI"), _lookup(transport, func_series, "functional")
    return fuse_partners(transport, fuser, study, mr, func, transport.series_in_study(study), settings,
                         cache or SliceCache(None))


def _register(transport: Transport, study: str, mr: Volume, func_info: SeriesInfo, func: Volume,
              series: list[SeriesInfo], settings: PacsSettings) -> Registration:
    """Rigid registration onto the MR: through the functional series' CT partner (same Frame of Reference,
    as on a PET/CT) when there is one, because CT-MR registers far more robustly than PET-MR."""
    ct = next((s for s in series if s.modality == "CT" and s.uid != func_info.uid
               and s.frame_of_reference_uid == func_info.frame_of_reference_uid), None)
    moving = func if ct is None or func_info.modality == "CT" else volume_from_datasets(
        transport.retrieve_series(study, ct.uid))
    limits = RegistrationLimits(settings.register_max_rotation_deg, settings.register_max_translation_mm)
    result = register_rigid(mr, moving, limits)
    log.info("series registered", extra={"study": study, "registration": result.describe()})
    return result


def _expected(done: SeriesInfo, mr_info: SeriesInfo) -> int:
    """Instances a complete derived series has: its description says which MR slices were fused."""
    fused = fused_count(done.description)
    return mr_info.count if fused is None else fused


def fuse_partners(transport: Transport, fuser: SliceFuser, study: str, mr_info: SeriesInfo, func_info: SeriesInfo,
                  series: list[SeriesInfo], settings: PacsSettings, cache: SliceCache) -> FusionReport:
    """Partners -> stored derived series (or "exists" without retrieving anything); raises on refusal.

    :func:`check_partners` runs first, from the series list alone: a refusal retrieves nothing."""
    check_partners(study, mr_info, func_info, allow_other_frame=settings.registration == "rigid")
    registered = different_frames(mr_info.frame_of_reference_uid, func_info.frame_of_reference_uid)
    weights = fuser.weights_sha256 + (f"/rigid/{settings.register_max_rotation_deg}/"
                                      f"{settings.register_max_translation_mm}" if registered else "")
    series_uid = dicom.derived_series_uid(study, mr_info.uid, func_info.uid, weights)
    done = next((s for s in series if s.uid == series_uid), None)
    if done is not None and done.count >= _expected(done, mr_info) > 0:
        return FusionReport(study, series_uid, "exists", done.count, func_info.modality)
    mr_ds = transport.retrieve_series(study, mr_info.uid)
    func_ds = transport.retrieve_series(study, func_info.uid)
    mr, func = volume_from_datasets(mr_ds), volume_from_datasets(func_ds, frame=settings.frame_index())
    registration = _register(transport, study, mr, func_info, func, series, settings) if registered else None
    window = (settings.functional_window, str(settings.suv_max), weights)
    result = fuse_volumes(mr, func, fuser, registration=registration, functional_window=settings.functional_window,
                          suv_max=settings.suv_max, batch_size=settings.service_batch_size, cache=cache,
                          cache_key=lambda k, src: SliceCache.key(*mr.sources[k], str(k),
                                                                  *(func.sources[i][1] for i in src), *window))
    fused_range = result.range_text(mr.shape[0])
    for warning in result.warnings:
        log.warning("fused study flagged", extra={"problem": warning, "fused_range": fused_range})
    info = dicom.derived_info(series_uid, mr_info.uid, func_info.uid, mr, func, result, fuser.model_name,
                                 fuser.weights_sha256, settings.functional_window)
    out = dicom.derived_series(mr_ds, mr, func_info.uid, func, result, info)
    failed = transport.store(out)
    if failed:
        raise PacsError(f"{len(failed)} of {len(out)} fused instances were not stored (series {series_uid}); "
                        "re-run to complete it: fused slices are cached, only the store is repeated")
    cache.drop(result.cache_keys)
    log.info("fused series stored", extra={"instances": len(out), "modality": result.modality,
                                           "reused": result.reused, "fused_range": fused_range})
    return FusionReport(study, series_uid, "stored", len(out), func_info.modality, fused_range=fused_range,
                        registration=registration.describe() if registration else "")
