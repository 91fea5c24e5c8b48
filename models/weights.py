"""The shipped-weights file format: config + UNet + fusion head + metadata, with sha256 verification."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.configs import ModelConfig
from models.fusion_head import FusionHead
from models.unet import UNet

if TYPE_CHECKING:
    from models.pipeline import FusionPipeline

FORMAT = "dmfnet-weights/1"
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "dmfnet_small.pt"


class WeightsError(RuntimeError):
    """Weights file missing, corrupt, checksum mismatch or not matching its configuration."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_networks(cfg: ModelConfig) -> tuple[UNet, FusionHead]:
    """Fresh UNet and fusion head for a configuration."""
    unet = UNet(cfg.unet)
    return unet, FusionHead(cfg.fusion, unet.feature_channels)


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


def load_state(net: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict with one clear error listing missing/unexpected/mis-shaped tensors."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
            f"shape mismatches: {shapes[:3]}" if shapes else "",
        ]
        raise WeightsError(f"{what} weights do not match the configuration: " + "; ".join(p for p in parts if p))
    net.load_state_dict(state)


def load_weights(path: str | Path, expected_sha256: str | None = None) -> tuple[ModelConfig, UNet, FusionHead, dict]:
    """Load a weights file, verifying its checksum first when one is expected."""
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
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise WeightsError(f"{path} is not a {FORMAT} file")
    cfg = ModelConfig.model_validate(obj["config"])
    unet, head = build_networks(cfg)
    load_state(unet, obj["unet"], "UNet")
    load_state(head, obj["head"], "fusion head")
    return cfg, unet, head, json.loads(obj.get("meta") or "{}")


MANIFEST = DEFAULT_WEIGHTS.parent / "weights.json"


def expected_checksum(path: Path) -> str | None:
    """The sha256 recorded for a shipped weights file in ``weights/weights.json`` (None if not listed)."""
    import json

    if not MANIFEST.exists():
        return None
    files = json.loads(MANIFEST.read_text()).get("files", {})
    entry = files.get(Path(path).name)
    return entry["sha256"] if entry and Path(path).resolve().parent == MANIFEST.parent else None


def open_pipeline(weights: str | None = None, device: str | None = None, **kw) -> FusionPipeline:
    """Build the pipeline from ``weights``: None = shipped default, ``random:CONFIG`` = untrained, else a path.

    Shipped weights are verified against ``weights/weights.json``; other files are hashed and reported.
    """
    from models.pipeline import FusionPipeline  # the pipeline loads its networks from this module

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if weights and weights.startswith("random:"):
        return FusionPipeline.random_init(weights.split(":", 1)[1], device=device, **kw)
    path = Path(weights) if weights else DEFAULT_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} not found")
    return FusionPipeline.from_weights(path, expected_checksum(path), device=device, **kw)
