"""Training data: the case-level split, in-memory luminance slices, seeded crops and flips/rotations."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from models.images.colour import luminance, split_luma
from models.images.imaging import decode_image
from models.images.pairs import PairFiles, discover_pairs, split_pairs


class DataError(ValueError):
    """The training data does not fit the run config (reported by the CLI without a traceback)."""


def load_split(root: Path, split_file: Path) -> dict[str, list[PairFiles]]:
    """{'train': [...], 'val': [...]} by the split file's validation *cases* (never by slice)."""
    split = split_pairs(discover_pairs(root), split_file)
    if not split["train"] or not split["val"]:
        raise DataError(f"split {split_file} leaves an empty train or validation set under {root}")
    return split


def load_pair_luma(pair: PairFiles) -> tuple[np.ndarray, np.ndarray]:
    """(MRI luminance, functional luminance) as float32 [0, 1]."""
    mri = luminance(decode_image(pair.mri, label="mri"))
    func, _ = split_luma(decode_image(pair.functional, label=pair.modality))
    return mri, func


def check_tasks_present(pairs: list[PairFiles], names: Iterable[str], field: str) -> None:
    """DataError when a config field names a task that has no training pairs (a typo would silently do nothing)."""
    unknown = set(names) - {p.task for p in pairs}
    if unknown:
        raise DataError(f"{field} names tasks with no training pairs: {sorted(unknown)}")


def task_sampling_weights(pairs: list[PairFiles], task_weights: dict[str, float]) -> np.ndarray | None:
    """Per-pair sampling weights from per-task weights (None when no task is reweighted)."""
    if not task_weights:
        return None
    check_tasks_present(pairs, task_weights, "task_weights")
    return np.array([task_weights.get(p.task, 1.0) for p in pairs], np.float64)


class CropSampler:
    """Random crops of a stack of same-size images, with flips and 90-degree rotations, all seeded."""

    def __init__(self, images: np.ndarray, crop: int, weights: np.ndarray | None = None) -> None:
        """images: (N, C, H, W) float32; each sample takes all C channels at the same crop.

        weights: optional (N,) relative probability of drawing each image (uniform when None).
        """
        self.images = torch.from_numpy(images)
        self.crop = crop
        n, _, h, w = images.shape
        if crop > h or crop > w:
            raise DataError(f"crop {crop} larger than images {h}x{w}")
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if self.weights is not None and (self.weights.shape != (n,) or not bool((self.weights > 0).all())):
            raise DataError(f"weights must be {n} positive numbers")

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(batch, C, crop, crop) in [0, 1]."""
        return self.sample_indexed(batch, generator)[0]

    def sample_indexed(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, list[int]]:
        """Crops as in ``sample`` and the index of the image each crop came from (same random draws)."""
        n, _, h, w = self.images.shape
        if self.weights is None:
            idx = torch.randint(0, n, (batch,), generator=generator)
        else:
            idx = torch.multinomial(self.weights, batch, replacement=True, generator=generator)
        ys = torch.randint(0, h - self.crop + 1, (batch,), generator=generator)
        xs = torch.randint(0, w - self.crop + 1, (batch,), generator=generator)
        flips = torch.randint(0, 2, (batch,), generator=generator)
        rots = torch.randint(0, 4, (batch,), generator=generator)
        out = []
        for i, y, x, f, r in zip(idx.tolist(), ys.tolist(), xs.tolist(), flips.tolist(), rots.tolist()):
            c = self.images[i, :, y : y + self.crop, x : x + self.crop]
            if f:
                c = c.flip(-1)
            out.append(torch.rot90(c, r, dims=(-2, -1)))
        return torch.stack(out).contiguous(), idx.tolist()
