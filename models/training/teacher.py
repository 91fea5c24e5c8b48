"""Teacher targets for distillation: the shipped DM-FNet's fused luminance of every pair, cached on disk.

The teacher is deterministic, so its output for a pair is computed once and kept as float32 ``.npy`` under
``cache/<task>/<pair id>.npy`` (written atomically: an interrupted run keeps what it finished and resumes).
The cache folder is named after the teacher's sha256, so a different teacher never reuses stale targets.
Labelling runs in ``workers`` processes with one torch thread each (two processes with two threads each on
two cores run several times slower than one each).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.images.pairs import PairFiles
from models.inference.manifest import sha256_file
from models.nets.losses import sobel
from models.training.config import TeacherTerms

_TEACHER = None  # the pipeline of one labelling worker process


def teacher_id(teacher: str) -> str:
    """sha256 of the teacher's weights file (of the name for ``random:CONFIG`` test teachers)."""
    return sha256_file(teacher) if Path(teacher).is_file() else hashlib.sha256(teacher.encode()).hexdigest()


def target_path(cache: Path, pair: PairFiles) -> Path:
    """Where the teacher's fused luminance of ``pair`` is cached."""
    return cache / pair.task / f"{pair.pair_id}.npy"


def _init_worker(weights: str) -> None:
    global _TEACHER
    import torch

    torch.set_num_threads(1)
    from models.inference.weights import open_pipeline

    _TEACHER = open_pipeline(weights, "cpu")


def _label(pair: PairFiles, out: Path) -> Path:
    from models.evaluation.report import load_prepared

    luma = _TEACHER.fuse_lumas([load_prepared(pair)])[0]  # type: ignore[union-attr]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npy")
    np.save(tmp, luma.astype(np.float32))
    os.replace(tmp, out)
    return out


def label_teacher(pairs: list[PairFiles], weights: str, cache: Path, workers: int = 2,
                  progress: bool = True) -> dict[tuple[str, str], Path]:
    """Make sure every pair has a cached teacher target; returns {(task, pair id): path}."""
    todo = [p for p in pairs if not target_path(cache, p).exists()]
    if todo:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max(1, workers), mp_context=ctx, initializer=_init_worker,
                                 initargs=(weights,)) as pool:
            futures = [pool.submit(_label, p, target_path(cache, p)) for p in todo]
            bar = tqdm(total=len(pairs), initial=len(pairs) - len(todo), desc="teacher targets", unit="pair",
                       disable=not progress)
            for f in as_completed(futures):
                f.result()
                bar.update(1)
            bar.close()
    return {(p.task, p.pair_id): target_path(cache, p) for p in pairs}


def teacher_terms(fused: torch.Tensor, target: torch.Tensor, w: TeacherTerms) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted L1 between a fused image and the teacher's, and between their Sobel gradients (all (B, 1, H, W)
    luminance in [0, 1]); returns the total and its unweighted parts."""
    l_t = F.l1_loss(fused, target)
    l_g = F.l1_loss(sobel(fused), sobel(target))
    return w.teacher * l_t + w.teacher_gradient * l_g, {"teacher_l1": l_t.item(), "teacher_grad": l_g.item()}
