"""Weights files, with sha256 verification: one format per model kind (models/inference/kinds.py).

``dmfnet-weights/1``: DM-FNet config + UNet + fusion head + metadata. ``dmfnet-fast-weights/1``: the distilled
fast network's config + state + metadata. :func:`open_pipeline` finds the kind by the format field and lets its
pipeline build itself from the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.inference.errors import WeightsError
from models.inference.kinds import FORMATS, kind, kind_of_format
from models.inference.manifest import TIERS, expected_checksum, resolve_weights, sha256_file
from models.nets.configs import ModelConfig
from models.nets.fast_net import FastConfig, FastFusionNet
from models.nets.fusion_head import FusionHead
from models.nets.unet import UNet

if TYPE_CHECKING:
    from models.inference.fuser import Fuser

FORMAT = kind("full").format
FAST_FORMAT = kind("fast").format
DEFAULT_WEIGHTS = kind("full").shipped
FAST_WEIGHTS = kind("fast").shipped


def save_weights(path: str | Path, cfg: ModelConfig, unet: UNet, head: FusionHead, meta: dict[str, Any]) -> str:
    """Write a weights file (fp32 tensors) and return its sha256."""
    obj = {
        "format": FORMAT,
        "config": cfg.model_dump(mode="json"),
        "unet": {k: v.detach().float().cpu().clone() for k, v in unet.state_dict().items()},
        "head": {k: v.detach().float().cpu().clone() for k, v in head.state_dict().items()},
        "meta": json.dumps(meta),
    }
    torch.save(obj, path)
    return sha256_file(path)


def _read(path: str | Path, expected_sha256: str | None, formats: tuple[str, ...]) -> dict:
    """The weights file's object, after the checksum (when expected) and format checks."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise WeightsError(f"weights {path} sha256 {actual[:12]}... != expected {expected_sha256[:12]}...")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise WeightsError(f"weights {path} could not be read: {type(exc).__name__}") from None
    if not isinstance(obj, dict) or obj.get("format") not in formats:
        raise WeightsError(f"{path} is not a {' or '.join(formats)} file")
    return obj


def load_weights(path: str | Path, expected_sha256: str | None = None) -> tuple[ModelConfig, UNet, FusionHead, dict]:
    """Load a DM-FNet weights file, verifying its checksum first when one is expected."""
    from models.inference.pipeline import FusionPipeline

    return FusionPipeline.networks_from(_read(path, expected_sha256, (FORMAT,)))


def save_fast_weights(path: str | Path, cfg: FastConfig, net: FastFusionNet, meta: dict[str, Any]) -> str:
    """Write a ``dmfnet-fast`` weights file (fp32) and return its sha256."""
    obj = {"format": FAST_FORMAT, "config": cfg.model_dump(mode="json"),
           "net": {k: v.detach().float().cpu().clone() for k, v in net.state_dict().items()},
           "meta": json.dumps(meta)}
    torch.save(obj, path)
    return sha256_file(path)


def load_fast_weights(path: str | Path, expected_sha256: str | None = None) -> tuple[FastConfig, FastFusionNet, dict]:
    """Load a ``dmfnet-fast`` weights file, verifying its checksum first when one is expected."""
    from models.inference.fast_pipeline import FastPipeline

    return FastPipeline.networks_from(_read(path, expected_sha256, (FAST_FORMAT,)))


def weights_format(path: str | Path) -> str:
    """The format field of a weights file (WeightsError when it is neither format)."""
    return _read(path, None, FORMATS)["format"]


def open_pipeline(weights: str | None = None, device: str | None = None, **kw) -> Fuser:
    """Build the pipeline from ``weights``: None or ``full`` = shipped DM-FNet, ``fast`` = shipped fast tier,
    ``random:CONFIG`` = untrained (``random:fast`` for the fast network), else a path to either format.

    Shipped weights are verified against ``weights/weights.json``; other files are hashed and reported.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if weights and weights.startswith("random:"):
        name = weights.split(":", 1)[1]
        if name in TIERS and name != "full":  # random:fast: that kind's own untrained network
            return kind(name).pipeline_class().random_init(device=device, **kw)
        return kind("full").pipeline_class().random_init(name, device=device, **kw)  # random:<DM-FNet config>
    path = resolve_weights(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    expected = expected_checksum(path)
    obj = _read(path, expected, FORMATS)  # read once; the format picks the kind
    kw.update(weights_path=str(path), weights_sha256=expected or sha256_file(path), device=device)
    return kind_of_format(obj["format"]).pipeline_class().from_weights(obj, **kw)
