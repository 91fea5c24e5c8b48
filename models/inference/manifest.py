"""The shipped weights' manifest (``weights/weights.json``): names, checksums and the tiers' files, torch-free.

Read by the torch pipelines (:mod:`models.inference.weights`) and by the ONNX Runtime path that runs without torch
(:mod:`models.inference.graph_fuser`), so both verify the same checksums.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from models.inference.kinds import KINDS, WEIGHTS_DIR

MANIFEST = WEIGHTS_DIR / "weights.json"
# Names accepted wherever weights are chosen (--weights, DMFNET_WEIGHTS): the shipped tiers.
TIERS = {k.tier: k.shipped for k in KINDS}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_files() -> dict[str, dict]:
    """``weights.json``'s file entries (empty when there is no manifest)."""
    return json.loads(MANIFEST.read_text()).get("files", {}) if MANIFEST.exists() else {}


def expected_checksum(path: Path) -> str | None:
    """The sha256 recorded for a shipped weights file in ``weights/weights.json`` (None if not listed)."""
    entry = manifest_files().get(Path(path).name)
    return entry["sha256"] if entry and Path(path).resolve().parent == MANIFEST.parent else None


def resolve_weights(weights: str | None) -> Path:
    """``None``/``full`` -> the shipped DM-FNet, ``fast`` -> the shipped fast tier, anything else a path."""
    return TIERS.get(weights or "full", Path(weights or ""))
