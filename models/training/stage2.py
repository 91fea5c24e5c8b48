"""Stage II: train the fusion head on the frozen Stage I UNet with the hybrid loss (no ground truth).

Validation runs the real inference pipeline (deterministic noise, full-size images) on a fixed subset
of the validation split, scores it with the evaluation metrics next to the four classical baselines,
and keeps the best head by this criterion: the number of (task, metric) cells, over MRI-CT/PET/SPECT
and EN, SD, SF, AG, MI, SCD, VIF, Qabf, SSIM, where the model beats every baseline; ties go to the
higher mean Qabf + VIF + SSIM/2 - Speckle/10 over tasks (Speckle/10: its spread between heads, ~0.5-1, then
weighs as much as a 0.05-0.1 step in VIF or Qabf, so a sharper head that adds speckle does not win the tie).
The best head is exported as a shipped-weights file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from models.evaluation.baselines import BASELINES, fuse_baseline
from models.evaluation.metrics import QUALITY_METRICS, score_pair
from models.evaluation.report import delivered_luma, summarize, wins_against_baselines
from models.images.pair_input import decode_pair
from models.images.pairs import PairFiles, spread_per_task
from models.inference.pipeline import FusionPipeline
from models.inference.weights import load_weights, save_weights
from models.nets.configs import FusionConfig, ModelConfig
from models.nets.fusion_head import FusionHead
from models.nets.losses import hybrid_loss
from models.training.common import TASKS, RunLoop, metric_columns, metric_row, open_run
from models.training.config import Stage2Config
from models.training.data import (
    CropSampler,
    DataError,
    check_tasks_present,
    load_pair_luma,
    load_split,
    task_sampling_weights,
)
from models.training.stage1 import ema_unet
from models.training.teacher import label_teacher, teacher_id, teacher_terms

CHECKPOINT = "checkpoint.pt"
BEST_WEIGHTS = "best_weights.pt"
TEACHER_RECORD = "teacher.json"  # which teacher a run's labels came from
MAX_WINS = len(TASKS) * len(QUALITY_METRICS)  # task x metric cells where the model can beat every baseline


def val_subset(pairs: list[PairFiles], per_task: int) -> list[PairFiles]:
    """Evenly spaced validation pairs per task (fixed, so rounds are comparable)."""
    return spread_per_task(pairs, per_task)


def score(pipe: FusionPipeline | None, method: str, prepared: list, pairs: list[PairFiles]) -> list[dict]:
    """Per-image metric rows for the model (pipe) or a baseline on prepared validation pairs."""
    results = pipe.fuse(prepared) if pipe is not None else fuse_baseline(method, prepared)
    return [row for p, inp, res in zip(pairs, prepared, results, strict=True)
            for row in score_pair(p.task, p.pair_id, inp.mri_y, inp.func_y, {method: delivered_luma(res.pixels)})]


def criterion(summary: dict) -> tuple[int, float]:
    """(total wins over all baselines, tie-break mean Qabf + VIF + SSIM/2 - Speckle/10)."""
    wins = sum(len(w) for w in wins_against_baselines(summary).values())
    per = summary["model"].values()
    tie = float(np.mean([s["Qabf"] + s["VIF"] + s["SSIM"] / 2 - s["Speckle"] / 10 for s in per]))
    return wins, tie


def _by_task(fused: torch.Tensor, tasks: list[str], per_task: dict, default,
             score: Callable[[torch.Tensor | slice, object], tuple[torch.Tensor, dict[str, float]]],
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Score each task's crops with its entry of ``per_task`` (else ``default``): ``score(rows, weights)``.

    Each group's mean is weighted by its share of the batch. With one group this is ``score(slice(None),
    default)``: the whole batch as a view, bit for bit the unsplit terms.
    """
    groups: dict[str | None, list[int]] = {}
    for i, task in enumerate(tasks):
        groups.setdefault(task if task in per_task else None, []).append(i)
    if list(groups) == [None]:
        return score(slice(None), default)
    total = fused.new_zeros((), dtype=torch.float32)
    parts: dict[str, float] = {}
    for task, rows in groups.items():
        loss, p = score(torch.tensor(rows, device=fused.device), default if task is None else per_task[task])
        share = len(rows) / len(tasks)
        total = total + share * loss
        for k, v in p.items():
            parts[k] = parts.get(k, 0.0) + share * v
    return total, parts


def batch_loss(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tasks: list[str],
               cfg: Stage2Config) -> tuple[torch.Tensor, dict[str, float]]:
    """Hybrid loss of a batch: crops of a task in ``cfg.loss_by_task`` use its weights, the rest ``cfg.loss``."""
    return _by_task(fused, tasks, cfg.loss_by_task, cfg.loss,
                    lambda rows, w: hybrid_loss(fused[rows], a[rows], b[rows], w))


def batch_teacher_terms(fused: torch.Tensor, target: torch.Tensor, tasks: list[str],
                        cfg: Stage2Config) -> tuple[torch.Tensor, dict[str, float]]:
    """Teacher terms of a batch: crops of a task in ``cfg.teacher_by_task`` use its weights, the rest
    ``cfg.teacher_loss``."""
    return _by_task(fused, tasks, cfg.teacher_by_task, cfg.teacher_loss,
                    lambda rows, w: teacher_terms(fused[rows], target[rows], w))


class _Validation:
    """Stage II validation: the real pipeline on fixed pairs next to the baselines; exports the best head."""

    def __init__(self, cfg: Stage2Config, pipe: FusionPipeline, model_cfg: ModelConfig, s1: dict, run: Path,
                 loop: RunLoop, best: dict | None) -> None:
        self.cfg, self.pipe, self.model_cfg, self.s1, self.run, self.loop, self.best = (
            cfg, pipe, model_cfg, s1, run, loop, best)
        split = load_split(cfg.data.root, cfg.data.split_file)
        self.pairs = val_subset(split["val"], cfg.val_pairs_per_task)
        self.inputs = [decode_pair(p.mri, p.functional, p.modality) for p in self.pairs]
        self.baseline_rows = []
        if loop.info.is_main:
            for m in BASELINES:
                self.baseline_rows += score(None, m, self.inputs, self.pairs)

    def __call__(self) -> dict:
        """Score the head (rank 0 only); keep and export it when it is the best so far."""
        if not self.loop.info.is_main:
            return {}
        head = self.pipe.head
        head.eval()
        rows = score(self.pipe, "model", self.inputs, self.pairs)
        head.train()
        summary = summarize(rows + self.baseline_rows)
        crit = criterion(summary)
        out = {"val_wins": crit[0], "val_tiebreak": crit[1]}
        out.update(metric_row(summary["model"]))
        if self.best is None or tuple(crit) > tuple(self.best["criterion"]):
            self.best = {"step": self.loop.step, "criterion": list(crit), "wins": wins_against_baselines(summary),
                         "summary": summary}
            self._export()
        tqdm.write(f"step {self.loop.step}: validation wins {crit[0]}/{MAX_WINS} (best {self.best['criterion'][0]} "
                   f"at step {self.best['step']})")
        return out

    def _export(self) -> None:
        cfg, s1 = self.cfg, self.s1
        meta = {**_provenance(cfg, s1), "stage1_wall_s": round(s1["wall_s"], 1), "stage2_steps": self.loop.step,
                "stage2_wall_s": round(self.loop.wall, 1), "validation": self.best}
        save_weights(self.run / BEST_WEIGHTS, self.model_cfg, self.pipe.unet, _plain(self.pipe.head), meta)
        (self.run / "best.json").write_text(json.dumps(self.best, indent=2))


def _plain(head: torch.nn.Module) -> torch.nn.Module:
    """The head itself, also when DDP wraps it."""
    return head.module if isinstance(head, DDP) else head


def _model_config(cfg: Stage2Config, s1: dict) -> ModelConfig:
    """The Stage I checkpoint's model config, with the run's ``head_output`` when it sets one."""
    model_cfg = ModelConfig.model_validate(s1["model_config"])
    update = {k: v for k, v in (("output", cfg.head_output), ("gain_sigma", cfg.head_gain_sigma)) if v is not None}
    if not update:
        return model_cfg
    return model_cfg.model_copy(update={"fusion": FusionConfig.model_validate({**model_cfg.fusion.model_dump(),
                                                                                **update})})


def _trainable_head(cfg: Stage2Config, model_cfg: ModelConfig, unet: torch.nn.Module, resume: bool) -> FusionHead:
    """A new head, or ``init_head``'s weights for a fine-tune (checked against the Stage I config). An init head
    of the other output form gives every layer but the last, which keeps its fresh start (see FusionHead); a
    "mix" init head for a "mix_gain" run keeps all of them (k = 0), so the run starts at the init's output."""
    head = FusionHead(model_cfg.fusion, unet.feature_channels)
    if cfg.init_head is not None and not resume:
        init_cfg, _, init, _ = load_weights(cfg.init_head)
        form = {"output": model_cfg.fusion.output, "gain_sigma": model_cfg.fusion.gain_sigma}
        if init_cfg.fusion.model_copy(update=form) != model_cfg.fusion:
            raise DataError(f"init_head {cfg.init_head}: fusion config differs from the Stage I checkpoint's")
        fresh = head.state_dict()  # what init lacks (a gain conv: k = 0) keeps its fresh start
        state = {k: v for k, v in init.state_dict().items() if k in fresh}  # a gain the run lacks is dropped
        forms = {init_cfg.fusion.output, model_cfg.fusion.output}
        if len(forms) > 1 and "luma" in forms:  # luma <-> mix: the last conv (out.2) keeps its fresh start
            state = {k: v for k, v in state.items() if not k.startswith("out.2.")}
        head.load_state_dict({**fresh, **state})
    return head


def _trained_parameters(cfg: Stage2Config, head: FusionHead) -> list[torch.nn.Parameter]:
    """The head's parameters the run trains: all, or the gain's alone (``train_only: gain``; the rest frozen)."""
    if cfg.train_only is None:
        return list(head.parameters())
    if head.gain_out is None:
        raise DataError("train_only: gain needs head_output: mix_gain")
    head.requires_grad_(False)
    head.gain_out.requires_grad_(True)
    return list(head.gain_out.parameters())


def _provenance(cfg: Stage2Config, s1: dict) -> dict:
    """What every exported Stage II head records of how it was made (Stage I start, loss, initial head)."""
    return {"stage1_steps": s1["step"], "stage1_checkpoint": str(cfg.stage1_checkpoint),
            "loss_weights": cfg.loss.model_dump(),
            "loss_by_task": {t: w.model_dump() for t, w in cfg.loss_by_task.items()},
            "init_head": str(cfg.init_head) if cfg.init_head else None,
            "teacher": ({"weights": cfg.teacher, "sha256": _teacher_sha(cfg), **cfg.teacher_loss.model_dump(),
                         "by_task": {t: w.model_dump() for t, w in cfg.teacher_by_task.items()}}
                        if cfg.teacher else None)}


def export_checkpoint_head(cfg: Stage2Config, checkpoint: str | Path | None, out: str | Path) -> Path:
    """Write the head of a Stage II checkpoint (default: the run's latest) with its Stage I UNet as weights ``out``.

    The best-by-criterion export is only one view of a run; this lets any saved step be scored on the full split.
    """
    src = Path(checkpoint) if checkpoint else Path(cfg.run_dir) / CHECKPOINT
    if not src.is_file():
        raise DataError(f"no Stage II checkpoint at {src}")
    state = torch.load(src, map_location="cpu", weights_only=False)
    if state.get("stage") != "stage2":
        raise DataError(f"{src} is a {state.get('stage')} checkpoint, not a Stage II one")
    unet, s1 = ema_unet(cfg.stage1_checkpoint)
    model_cfg = _model_config(cfg, s1)
    head = FusionHead(model_cfg.fusion, unet.feature_channels)
    head.load_state_dict(state["head"])
    meta = {**_provenance(cfg, s1), "stage2_steps": state["step"], "stage2_wall_s": round(state["wall_s"], 1),
            "exported_from": str(src)}
    save_weights(out, model_cfg, unet, head, meta)
    return Path(out)


def _teacher_targets(cfg: Stage2Config, pairs: list[PairFiles], progress: bool) -> dict:
    """{(task, pair id): cached teacher luminance} of ``cfg.teacher`` for ``pairs``; empty without a teacher.
    The teacher's sha256 is recorded once per run: its labels are cached under it, and the file itself may be
    replaced later in a long run (e.g. by shipping new weights)."""
    if cfg.teacher is None:
        return {}
    sha = _teacher_sha(cfg)
    record = Path(cfg.run_dir) / TEACHER_RECORD
    if not record.exists():
        record.write_text(json.dumps({"weights": cfg.teacher, "sha256": sha}) + "\n")
    return label_teacher(pairs, cfg.teacher, Path(cfg.run_dir) / f"teacher_{sha[:12]}", cfg.teacher_workers, progress)


def _teacher_sha(cfg: Stage2Config) -> str:
    """The teacher's sha256 as the run recorded it when it first labelled (see :func:`_teacher_targets`), else
    the file's own."""
    record = Path(cfg.run_dir) / TEACHER_RECORD
    return json.loads(record.read_text())["sha256"] if record.exists() else teacher_id(cfg.teacher)


def train_stage2(cfg: Stage2Config, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) Stage II; returns the path of the best exported weights."""
    info, run, ckpt_path = open_run(cfg, CHECKPOINT, resume)
    device = info.device
    unet, s1 = ema_unet(cfg.stage1_checkpoint)
    model_cfg = _model_config(cfg, s1)
    torch.manual_seed(cfg.seed + info.rank)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 7 + info.rank)
    # --resume with no checkpoint yet is a fresh start: init_head still applies (once, it was silently skipped)
    head = _trainable_head(cfg, model_cfg, unet, resume and ckpt_path.exists())
    pipe = FusionPipeline(model_cfg, unet, head, device=device, precision=cfg.precision,
                          channels_last=cfg.channels_last)
    head.train().requires_grad_(True)  # the pipeline froze it; Stage II trains it
    # torch 2.13 CPU segfaults in GroupNorm backward on a channels_last input that does not require grad
    # (minimal repro: GroupNorm(4, 16) on a channels_last (2, 16, 8, 8) tensor, .sum().backward()): the
    # head's first layer is exactly that, so the trained head stays in the default memory format.
    head.to(memory_format=torch.contiguous_format)
    opt = torch.optim.Adam(_trained_parameters(cfg, head), lr=cfg.lr)
    cols = ["loss", "intensity", "gradient", "ssim", "contrast", "speckle", "detail", "teacher_l1", "teacher_grad",
            "steps_per_s", "wall_s",
            "val_wins", "val_tiebreak", *metric_columns()]
    loop = RunLoop(cfg, info, run, ckpt_path, "stage2", opt, gen, cols, ["loss", "gradient", "val_wins"],
                   f"Stage II ({model_cfg.name})")
    state = loop.resume(resume)
    if state is not None:
        head.load_state_dict(state["head"])
    pipe.use_head(DDP(head) if info.world > 1 else head)

    split = load_split(cfg.data.root, cfg.data.split_file)
    check_tasks_present(split["train"], cfg.loss_by_task, "loss_by_task")
    check_tasks_present(split["train"], cfg.teacher_by_task, "teacher_by_task")
    train_tasks = [p.task for p in split["train"]]
    targets = _teacher_targets(cfg, split["train"], progress)
    stacks = [np.stack([*load_pair_luma(p), *([np.load(targets[(p.task, p.pair_id)])] if targets else [])])
              for p in split["train"]]
    train = CropSampler(np.stack(stacks).astype(np.float32), cfg.data.crop,
                        task_sampling_weights(split["train"], cfg.data.task_weights))
    validation = _Validation(cfg, pipe, model_cfg, s1, run, loop, state.get("best") if state else None)

    def train_step() -> tuple[torch.Tensor, dict]:
        batch, idx = train.sample_indexed(cfg.batch_size, gen)  # (B, 2 or 3, crop, crop): MRI, functional[, teacher]
        a, b = batch[:, :1], batch[:, 1:2]
        fa, fb = pipe.features(a, b, generator=gen)
        fa, fb = ({k: v.contiguous() for k, v in f.items()} for f in (fa, fb))
        fused = pipe.head_forward(fa, fb, a, b)
        tasks = [train_tasks[i] for i in idx]
        loss, parts = batch_loss(fused, a.to(device), b.to(device), tasks, cfg)
        if targets:
            extra, t_parts = batch_teacher_terms(fused.float(), batch[:, 2:].to(device), tasks, cfg)
            loss, parts = loss + extra, {**parts, **t_parts}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss, parts

    if cfg.init_head is not None and loop.step == 0 and info.is_main:
        # A fine-tune scores its starting head first, so its best is never worse than where it began.
        loop.log_row(0, 0.0, validation())
    loop.run(train_step, validation, lambda: {"best": validation.best, "head": head.state_dict()}, progress)
    return run / BEST_WEIGHTS
