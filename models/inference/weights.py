"""The shipped-weights file formats, with sha256 verification.

``dmfnet-weights/1``: DM-FNet config + UNet + fusion head + metadata. ``dmfnet-fast-weights/1``: the distilled
fast network's config + state + metadata. :func:`open_pipeline` tells them apart by the format field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.inference.errors import WeightsError
from models.nets.configs import ModelConfig
from models.nets.fast_net import FastConfig, FastFusionNet
from models.nets.fusion_head import FusionHead
from models.nets.networks import build_networks
from models.nets.unet import UNet

if TYPE_CHECKING:
    from models.inference.fuser import Fuser

FORMAT = "dmfnet-weights/1"
FAST_FORMAT = "dmfnet-fast-weights/1"
WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"  # <repo>/weights, beside models/
DEFAULT_WEIGHTS = WEIGHTS_DIR / "dmfnet_small.pt"
FAST_WEIGHTS = WEIGHTS_DIR / "dmfnet_fast.pt"
# Names accepted wherever weights are chosen (--weights, DMFNET_WEIGHTS): the shipped tiers.
TIERS = {"full": DEFAULT_WEIGHTS, "fast": FAST_WEIGHTS}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def _dmfnet_parts(obj: dict) -> tuple[ModelConfig, UNet, FusionHead, dict]:
    cfg = ModelConfig.model_validate(obj["config"])
    unet, head = build_networks(cfg)
    load_state(unet, obj["unet"], "UNet")
    load_state(head, obj["head"], "fusion head")
    return cfg, unet, head, json.loads(obj.get("meta") or "{}")


def _fast_parts(obj: dict) -> tuple[FastConfig, FastFusionNet, dict]:
    cfg = FastConfig.model_validate(obj["config"])
    net = FastFusionNet(cfg)
    load_state(net, obj["net"], "fast network")
    return cfg, net, json.loads(obj.get("meta") or "{}")


def load_weights(path: str | Path, expected_sha256: str | None = None) -> tuple[ModelConfig, UNet, FusionHead, dict]:
    """Load a DM-FNet weights file, verifying its checksum first when one is expected."""
    return _dmfnet_parts(_read(path, expected_sha256, (FORMAT,)))


def save_fast_weights(path: str | Path, cfg: FastConfig, net: FastFusionNet, meta: dict[str, Any]) -> str:
    """Write a ``dmfnet-fast`` weights file (fp32) and return its sha256."""
    obj = {"format": FAST_FORMAT, "config": cfg.model_dump(mode="json"),
           "net": {k: v.detach().float().cpu().clone() for k, v in net.state_dict().items()},
           "meta": json.dumps(meta)}
    torch.save(obj, path)
    return sha256_file(path)


def load_fast_weights(path: str | Path, expected_sha256: str | None = None) -> tuple[FastConfig, FastFusionNet, dict]:
    """Load a ``dmfnet-fast`` weights file, verifying its checksum first when one is expected."""
    return _fast_parts(_read(path, expected_sha256, (FAST_FORMAT,)))


def weights_format(path: str | Path) -> str:
    """The format field of a weights file (WeightsError when it is neither format)."""
    return _read(path, None, (FORMAT, FAST_FORMAT))["format"]


MANIFEST = DEFAULT_WEIGHTS.parent / "weights.json"


def expected_checksum(path: Path) -> str | None:
    """The sha256 recorded for a shipped weights file in ``weights/weights.json`` (None if not listed)."""
    import json

    if not MANIFEST.exists():
        return None
    files = json.loads(MANIFEST.read_text()).get("files", {})
    entry = files.get(Path(path).name)
    return entry["sha256"] if entry and Path(path).resolve().parent == MANIFEST.parent else None


def resolve_weights(weights: str | None) -> Path:
    """``None``/``full`` -> the shipped DM-FNet, ``fast`` -> the shipped fast tier, anything else a path."""
    return TIERS.get(weights or "full", Path(weights or ""))


def open_pipeline(weights: str | None = None, device: str | None = None, **kw) -> Fuser:
    """Build the pipeline from ``weights``: None or ``full`` = shipped DM-FNet, ``fast`` = shipped fast tier,
    ``random:CONFIG`` = untrained (``random:fast`` for the fast network), else a path to either format.

    Shipped weights are verified against ``weights/weights.json``; other files are hashed and reported.
    """
    from models.inference.fast_pipeline import FastPipeline  # the pipelines load their networks from this module
    from models.inference.pipeline import FusionPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if weights and weights.startswith("random:"):
        name = weights.split(":", 1)[1]
        if name == "fast":
            return FastPipeline.random_init(device=device, **kw)
        return FusionPipeline.random_init(name, device=device, **kw)
    path = resolve_weights(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    expected = expected_checksum(path)
    obj = _read(path, expected, (FORMAT, FAST_FORMAT))  # read once; the format picks the pipeline
    kw.update(weights_path=str(path), weights_sha256=expected or sha256_file(path), device=device)
    if obj["format"] == FAST_FORMAT:
        cfg, net, _ = _fast_parts(obj)
        return FastPipeline(cfg, net, **kw)
    cfg, unet, head, _ = _dmfnet_parts(obj)
    return FusionPipeline(cfg, unet, head, **kw)
