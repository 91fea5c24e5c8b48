"""Fast tier: distil the shipped DM-FNet into ``dmfnet-fast`` (:mod:`models.nets.fast_net`).

Targets are the teacher's fused luminance of every training pair (computed once, cached: see
:mod:`models.training.teacher`); crops of sources and target are drawn together with the same flips and
rotations. The loss matches the teacher's image and its Sobel gradients, plus a small share of the Stage II
hybrid loss. Validation fuses fixed validation pairs with the real pipeline and counts the (task, metric)
cells where the student stays within ``within`` (3%) of the teacher on the nine quality metrics; the best
student (ties: lower mean absolute difference to the teacher) is exported as a weights file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.evaluation.metrics import QUALITY_METRICS, score_pair
from models.evaluation.report import delivered_luma, summarize
from models.images.colour import merge_luma
from models.images.pair_input import decode_pair
from models.images.pairs import spread_per_task
from models.inference.fast_pipeline import FastPipeline
from models.inference.weights import load_fast_weights, save_fast_weights
from models.nets.fast_net import FastFusionNet
from models.nets.losses import hybrid_loss
from models.training.common import TASKS, RunLoop, metric_columns, metric_row, open_run
from models.training.config import DistillConfig, DistillLoss
from models.training.data import CropSampler, load_pair_luma, load_split, task_sampling_weights
from models.training.teacher import label_teacher, teacher_id, teacher_terms

CHECKPOINT = "checkpoint.pt"
BEST_WEIGHTS = "best_weights.pt"


def held_metrics(student: dict, teacher: dict, within: float = 0.03) -> dict[str, list[str]]:
    """Per task, the quality metrics on which the student's mean is within ``within`` of the teacher's."""
    return {task: [m for m in QUALITY_METRICS if abs(s[m] - teacher[task][m]) <= within * abs(teacher[task][m])]
            for task, s in student.items() if task in teacher}


def distill_loss(fused: torch.Tensor, target: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 w: DistillLoss) -> tuple[torch.Tensor, dict[str, float]]:
    """Total distillation loss and its parts (all images (B, 1, H, W) luminance in [0, 1])."""
    total, parts = teacher_terms(fused, target, w)
    if w.hybrid:
        l_h, _ = hybrid_loss(fused, a, b, w.hybrid_terms)
        total = total + w.hybrid * l_h
        parts["hybrid"] = l_h.item()
    return total, parts


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


class _Validation:
    """Student vs teacher on fixed validation pairs, through the real pipeline; exports the best student."""

    def __init__(self, cfg: DistillConfig, pipe: FastPipeline, targets: dict, teacher_sha: str, run: Path,
                 loop: RunLoop, best: dict | None) -> None:
        self.cfg, self.pipe, self.run, self.loop, self.best = cfg, pipe, run, loop, best
        self.teacher_sha = teacher_sha
        split = load_split(cfg.data.root, cfg.data.split_file)
        self.pairs = spread_per_task(split["val"], cfg.val_pairs_per_task)
        self.inputs = [decode_pair(p.mri, p.functional, p.modality) for p in self.pairs]
        self.teacher_y = [np.load(targets[(p.task, p.pair_id)]) for p in self.pairs]
        rows = []
        for p, inp, y in zip(self.pairs, self.inputs, self.teacher_y, strict=True):
            luma = delivered_luma(merge_luma(y, inp.chroma))
            rows += score_pair(p.task, p.pair_id, inp.mri_y, inp.func_y, {"teacher": luma})
        self.teacher = summarize(rows)["teacher"]

    def __call__(self) -> dict:
        """Score the student; keep and export it when it is the best so far."""
        net = self.pipe.net
        net.eval()
        lumas = self.pipe.fuse_lumas(self.inputs)
        net.train()
        rows, mad = [], []
        for p, inp, y, t in zip(self.pairs, self.inputs, lumas, self.teacher_y, strict=True):
            rows += score_pair(p.task, p.pair_id, inp.mri_y, inp.func_y,
                               {"model": delivered_luma(merge_luma(y, inp.chroma))})
            mad.append(float(np.abs(y - t).mean()) * 255)
        student = summarize(rows)["model"]
        held = held_metrics(student, self.teacher, self.cfg.within)
        crit = (sum(len(v) for v in held.values()), -float(np.mean(mad)))
        out = {"val_held": crit[0], "val_mad": -crit[1]}
        out.update(metric_row(student))
        if self.best is None or crit > tuple(self.best["criterion"]):
            self.best = {"step": self.loop.step, "criterion": list(crit), "held": held, "student": student,
                         "teacher": self.teacher}
            self._export()
        tqdm.write(f"step {self.loop.step}: {crit[0]}/{len(TASKS) * len(QUALITY_METRICS)} metrics within "
                   f"{self.cfg.within:.0%} of the teacher, MAD {-crit[1]:.2f}/255 (best {self.best['criterion'][0]} "
                   f"at step {self.best['step']})")
        return out

    def _export(self) -> None:
        cfg = self.cfg
        meta = {"teacher": str(cfg.teacher), "teacher_sha256": self.teacher_sha, "steps": self.loop.step,
                "wall_s": round(self.loop.wall, 1), "validation": self.best, "loss": cfg.loss.model_dump(),
                "crop": cfg.data.crop, "batch_size": cfg.batch_size,
                "init_student": str(cfg.init_student) if cfg.init_student else None}
        save_fast_weights(self.run / BEST_WEIGHTS, cfg.student, self.pipe.net, meta)
        (self.run / "best.json").write_text(json.dumps(self.best, indent=2))


def _initial_student(cfg: DistillConfig, resuming: bool) -> FastFusionNet:
    """A fresh student, or ``cfg.init_student``'s network when the run starts (a resume loads its checkpoint); an
    init student without the run's gain output keeps its weight and residual outputs and starts at k = 0."""
    net = FastFusionNet(cfg.student)
    if cfg.init_student is not None and not resuming:
        init_cfg, init_net, _ = load_fast_weights(cfg.init_student)
        if init_cfg.model_copy(update={"gain_sigma": cfg.student.gain_sigma}) != cfg.student:
            raise ValueError(f"init_student {cfg.init_student} is a {init_cfg.model_dump()} student, "
                             f"the run trains {cfg.student.model_dump()}")
        state = init_net.state_dict()
        if init_cfg.gain_sigma != cfg.student.gain_sigma:  # w and r kept, the gain starts at k = 0
            fresh = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("out.")}
            for k, v in fresh.items():
                n = min(len(v), len(state[k]), 8)
                v[:n] = state[k][:n]
            state.update(fresh)
        net.load_state_dict(state)
    return net


def train_distill(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) distillation; returns the path of the best exported student weights."""
    info, run, ckpt_path = open_run(cfg, CHECKPOINT, resume)
    split = load_split(cfg.data.root, cfg.data.split_file)
    teacher_sha = teacher_id(cfg.teacher)  # once: the file may be replaced while a long run goes on
    cache = run / f"teacher_{teacher_sha[:12]}"
    targets = label_teacher(split["val"] + split["train"], cfg.teacher, cache, cfg.teacher_workers, progress)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 11)
    net = _initial_student(cfg, resume and ckpt_path.exists())
    pipe = FastPipeline(cfg.student, net, info.device, precision=cfg.precision, channels_last=cfg.channels_last)
    net.train().requires_grad_(True)  # the pipeline froze it; this stage trains it
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    cols = ["loss", "teacher_l1", "teacher_grad", "hybrid", "lr", "steps_per_s", "wall_s", "val_held", "val_mad",
            *metric_columns()]
    loop = RunLoop(cfg, info, run, ckpt_path, "distill", opt, gen, cols, ["teacher_l1", "teacher_grad", "val_held"],
                   f"Distillation ({cfg.student.name})")
    state = loop.resume(resume)
    if state is not None:
        net.load_state_dict(state["net"])
    train = split["train"]
    stacks = [np.stack([*load_pair_luma(p), np.load(targets[(p.task, p.pair_id)])]) for p in train]
    sampler = CropSampler(np.stack(stacks).astype(np.float32), cfg.data.crop,
                          task_sampling_weights(train, cfg.data.task_weights))
    validation = _Validation(cfg, pipe, targets, teacher_sha, run, loop, state.get("best") if state else None)

    def train_step() -> tuple[torch.Tensor, dict]:
        for g in opt.param_groups:
            g["lr"] = lr_at(loop.step, cfg)
        batch = sampler.sample(cfg.batch_size, gen).to(info.device)  # (B, 3, crop, crop): MRI, other, teacher
        a, b, target = batch[:, :1], batch[:, 1:2], batch[:, 2:]
        loss, parts = distill_loss(net(a, b), target, a, b, cfg.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss, parts

    loop.run(train_step, validation, lambda: {"best": validation.best, "net": net.state_dict()}, progress)
    return run / BEST_WEIGHTS
