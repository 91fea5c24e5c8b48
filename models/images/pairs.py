"""Discovery of image pairs on disk: ``TASK/ID_mri.png`` + ``TASK/ID_{ct,pet,spect}.png`` or flat pairs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.images.pair_input import MODALITIES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass(frozen=True)
class PairFiles:
    """One MRI + functional pair on disk."""

    task: str  # e.g. "MRI-PET"
    pair_id: str  # e.g. "25042"
    modality: str  # ct | pet | spect
    mri: Path
    functional: Path

    @property
    def case(self) -> str:
        """Case (patient) part of a Harvard id: everything but the 3-digit slice number."""
        return self.pair_id[:-3] if len(self.pair_id) > 3 and self.pair_id.isdigit() else self.pair_id


def task_name(modality: str) -> str:
    """'pet' -> 'MRI-PET'."""
    return f"MRI-{modality.upper()}"


def discover_pairs(root: str | Path) -> list[PairFiles]:
    """All pairs under ``root`` (recursively), sorted by task then id; raises if none are found."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"pairs directory {root} does not exist")
    pairs = []
    for mri in sorted(root.rglob("*_mri.*")):
        if mri.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        stem = mri.name[: -len("_mri" + mri.suffix)]
        for modality in MODALITIES:
            matches = [mri.with_name(f"{stem}_{modality}{s}") for s in IMAGE_SUFFIXES]
            other = next((m for m in matches if m.exists()), None)
            if other is not None:
                pairs.append(PairFiles(task_name(modality), stem, modality, mri, other))
                break
    if not pairs:
        raise FileNotFoundError(f"no ID_mri.* / ID_ct|pet|spect.* pairs found under {root}")
    return sorted(pairs, key=lambda p: (p.task, p.pair_id))


def spread_per_task(pairs: list[PairFiles], per_task: int, skip_ends: bool = False) -> list[PairFiles]:
    """Up to ``per_task`` pairs of each task, evenly spaced over its list (deterministic)."""
    by_task: dict[str, list[PairFiles]] = {}
    for p in pairs:
        by_task.setdefault(p.task, []).append(p)
    out = []
    for task in sorted(by_task):
        ps = by_task[task]
        k = min(per_task, len(ps))
        idx = np.linspace(0, len(ps) - 1, k + 2)[1:-1] if skip_ends else np.linspace(0, len(ps) - 1, k)
        out += [ps[i] for i in dict.fromkeys(idx.round().astype(int).tolist())]
    return out


def split_pairs(pairs: list[PairFiles], split_file: str | Path) -> dict[str, list[PairFiles]]:
    """{'train': [...], 'val': [...]} by the split file's validation *cases* (never by slice)."""
    val_cases = {str(c) for c in json.loads(Path(split_file).read_text())["val_cases"]}
    return {"train": [p for p in pairs if p.case not in val_cases], "val": [p for p in pairs if p.case in val_cases]}
