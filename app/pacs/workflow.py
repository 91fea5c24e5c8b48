"""Fuse a study: retrieve both series, pair slices, window, fuse (service or in-process), store the derived series."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import httpx
import numpy as np

from app.pacs import dicom_io
from app.pacs.config import PacsSettings
from app.pacs.transport import PacsError, Transport, retry
from models.imaging import DecodedImage, decode_image, encode_png
from models.pipeline import FusionPipeline, prepare_pair

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

    def __init__(self, pipeline: FusionPipeline, batch_size: int = 8) -> None:
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.weights_sha256 = str(pipeline.weights_sha256 or pipeline.weights_path)
        self.model_name = pipeline.cfg.name

    def fuse(self, mri: list[np.ndarray], func: list[np.ndarray], modality: str) -> list[np.ndarray]:  # noqa: D102
        pairs = [prepare_pair(DecodedImage(_quantize(m), 8), DecodedImage(_quantize(f), 8), modality)
                 for m, f in zip(mri, func, strict=True)]
        out = []
        for i in range(0, len(pairs), self.batch_size):
            out += [r.pixels for r in self.pipeline.fuse(pairs[i : i + self.batch_size])]
        return out


class ServiceFuser:
    """A running ``dmfnet serve`` (the PNG round trip is lossless at 8 bits)."""

    def __init__(self, settings: PacsSettings) -> None:
        headers = {"X-API-Key": settings.service_api_key} if settings.service_api_key else {}
        self.client = httpx.Client(base_url=settings.service_url or "", headers=headers, timeout=settings.timeout_s)
        self.settings = settings
        version = retry(lambda: self.client.get("/version").raise_for_status().json(), settings,
                        (httpx.TransportError,), "service /version")
        self.weights_sha256 = str(version["model"]["weights_sha256"] or version["model"]["weights"])
        self.model_name = version["model"]["config"]

    def fuse(self, mri: list[np.ndarray], func: list[np.ndarray], modality: str) -> list[np.ndarray]:  # noqa: D102
        out = []
        for m, f in zip(mri, func, strict=True):
            files = {"mri": ("mri.png", encode_png(m)), "functional": ("functional.png", encode_png(f))}

            def post(files=files) -> httpx.Response:
                r = self.client.post("/fuse", files=files, data={"modality": modality})
                if r.status_code in (503, 504) or r.status_code >= 500:
                    raise httpx.TransportError(f"service answered {r.status_code}")
                if r.status_code != 200:
                    raise PacsError(f"service refused a slice: {r.status_code} {r.text[:200]}")
                return r

            r = retry(post, self.settings, (httpx.TransportError,), "service /fuse")
            out.append(decode_image(r.content).pixels)
        return out


@dataclass
class FusionReport:
    """What happened; printed as JSON by the CLI."""

    study: str
    series_uid: str
    status: str  # "stored" | "exists"
    instances: int
    failed: list[str] = field(default_factory=list)


def fuse_study(transport: Transport, fuser: Fuser, study: str, mri_series: str, func_series: str) -> FusionReport:
    """Fuse two co-registered series of a study and store the derived series in the same study.

    Idempotent: output UIDs are derived from the inputs and the weights, so a re-run finds the stored
    series and does nothing. A partial store raises :class:`PacsError` naming the failed instances.
    """
    mri = dicom_io.sort_series(transport.retrieve_series(study, mri_series))
    func = dicom_io.sort_series(transport.retrieve_series(study, func_series))
    dicom_io.check_pairing(mri, func)
    modality = dicom_io.functional_modality(func)
    series_uid, sop_uids = dicom_io.derived_uids(study, mri_series, func_series, fuser.weights_sha256, len(mri))
    existing = {s["uid"]: s for s in transport.series_in_study(study)}
    if series_uid in existing and existing[series_uid]["count"] >= len(mri):
        log.info("fused series already stored", extra={"instances": len(mri)})
        return FusionReport(study, series_uid, "exists", len(mri))
    fused = fuser.fuse(dicom_io.window_series(mri, "mri"), dicom_io.window_series(func, "functional"), modality)
    number = 9000 + int(series_uid.rsplit(".", 1)[-1][-3:]) % 1000  # stable, out of the scanner's usual range
    sources = f"MR + {func[0].Modality}"
    info = dicom_io.DerivedInfo(
        series_uid=series_uid, series_number=number,
        description=f"DM-FNet fusion {sources} - not for diagnosis",
        derivation=(f"DM-FNet fusion of MR series {mri_series} and {func[0].Modality} series {func_series}; "
                    f"model {fuser.model_name}, weights sha256 {fuser.weights_sha256}. {dicom_io.NOT_FOR_DIAGNOSIS}"),
        software=f"dmfnet {__import__('models').__version__} {fuser.model_name}",
    )
    out = [dicom_io.derived_dataset(m, f, y, uid, i, info)
           for i, (m, f, y, uid) in enumerate(zip(mri, func, fused, sop_uids, strict=True))]
    failed = transport.store(out)
    if failed:
        raise PacsError(f"{len(failed)} of {len(out)} fused instances were not stored (series {series_uid}); "
                        "re-run to complete it: stored instances are kept and identical ones are re-sent")
    log.info("fused series stored", extra={"instances": len(out), "modality": modality})
    return FusionReport(study, series_uid, "stored", len(out))


def candidate_pairs(transport: Transport, study: str, settings: PacsSettings) -> tuple[str, str] | None:
    """(MR series, functional series) of a study matching the watch rules, or None."""
    series = transport.series_in_study(study)
    rules = settings.watch
    mr = [s for s in series if s["modality"] == "MR"
          and (rules.mri_description_contains is None or rules.mri_description_contains in s["description"])]
    for wanted in rules.functional_modalities:
        func = [s for s in series if s["modality"] == wanted]
        if mr and func:
            return mr[0]["uid"], func[0]["uid"]
    return None


def watch_once(transport: Transport, fuser: Fuser, settings: PacsSettings) -> list[FusionReport]:
    """One polling pass: fuse every study that matches the rules and has no fused series yet."""
    reports = []
    for study in transport.studies():
        pair = candidate_pairs(transport, study, settings)
        if pair is None:
            continue
        try:
            reports.append(fuse_study(transport, fuser, study, *pair))
        except (PacsError, dicom_io.SeriesMismatch) as exc:
            log.error("study not fused", extra={"reason": str(exc)[:300]})
    return reports
