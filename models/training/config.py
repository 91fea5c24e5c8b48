"""Run configurations (YAML or JSON), validated with pydantic: one file fully describes a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.nets.configs import ModelConfig, get_config
from models.nets.fast_net import FastConfig
from models.nets.losses import LossWeights


class DataConfig(BaseModel):
    """Where the pairs are and how they are split and cropped."""

    model_config = ConfigDict(extra="forbid")

    root: Path = Path("../shared/data/harvard")
    split_file: Path = Path("configs/harvard_split.json")
    crop: int = 128
    val_crops: int = 64  # fixed validation crops (Stage I)
    # Stage II: relative sampling weight per task (e.g. {"MRI-CT": 3}); tasks left out weigh 1. Each
    # training pair is drawn with probability proportional to its task's weight, so a task's share of the
    # batches is weight x pair count over the sum of those (MRI-CT is 17% of the pairs at weight 1).
    task_weights: dict[str, float] = Field(default_factory=dict)

    @field_validator("task_weights")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if not w > 0}
        if bad:
            raise ValueError(f"task weights must be > 0, got {bad}")
        return v


class CommonRun(BaseModel):
    """Fields shared by both stages."""

    model_config = ConfigDict(extra="forbid")

    run_dir: Path
    data: DataConfig = Field(default_factory=DataConfig)
    batch_size: int = 8
    lr: float = 1e-4
    max_steps: int = 10000
    ckpt_every: int = 200
    val_every: int = 500
    log_every: int = 10
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where fast (models.inference.hardware)
    channels_last: bool | None = None  # None: with bf16 only
    threads: int | None = None


class Stage1Config(CommonRun):
    """Stage I: diffusion reconstruction training of the UNet."""

    stage: Literal["stage1"] = "stage1"
    model: str | ModelConfig = "small"
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    warmup_steps: int = 200
    # Continue from this Stage I checkpoint's EMA UNet (same model config) instead of a random init.
    init_unet: Path | None = None

    def model_cfg(self) -> ModelConfig:
        """The named or inline model configuration."""
        return get_config(self.model) if isinstance(self.model, str) else self.model


class TeacherTerms(BaseModel):
    """Weights of the L1 terms that pull a fused image towards a teacher's: its pixels and its Sobel gradients."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    teacher: float = 1.0
    teacher_gradient: float = 1.0


class Stage2Config(CommonRun):
    """Stage II: fusion-head training on the frozen Stage I UNet."""

    stage: Literal["stage2"] = "stage2"
    stage1_checkpoint: Path
    # Fine-tune: start the head from this weights file's head (same model config) instead of random init.
    init_head: Path | None = None
    # The head's output form (FusionConfig.output) when it should differ from the Stage I checkpoint's config:
    # "mix" predicts a per-pixel weight and residual over the sources. From a "luma" init_head, every layer but
    # the last is kept and the last starts at zero (the plain average of the sources).
    head_output: Literal["luma", "mix", "mix_gain"] | None = None
    # "mix_gain": the Gaussian (px) whose residual the head's gain scales (FusionConfig.gain_sigma).
    head_gain_sigma: float | None = None
    # "gain": train the mix_gain head's gain conv only (the rest of the head frozen at init_head's weights).
    train_only: Literal["gain"] | None = None
    loss: LossWeights = Field(default_factory=LossWeights)
    # Per-task replacements of ``loss`` (e.g. {"MRI-CT": {...}}): each crop is scored with its own task's
    # weights and targets. Tasks left out use ``loss``.
    loss_by_task: dict[str, LossWeights] = Field(default_factory=dict)
    lr: float = 2e-4
    val_pairs_per_task: int = 12  # validation pairs per task scored each time (full 256x256 images)
    # Born-again targets (Furlanello et al., ICML 2018): another model's fused luminance of every training pair
    # (e.g. the distilled fast tier, which scores above the head it was distilled from) as an extra L1 target on
    # the image and its Sobel gradients, beside the hybrid loss. None: the hybrid loss alone.
    teacher: str | None = None
    teacher_loss: TeacherTerms = Field(default_factory=TeacherTerms)
    # Per-task replacements of ``teacher_loss`` (e.g. {"MRI-CT": {"teacher": 0, "teacher_gradient": 0}}: that
    # task's crops learn from the hybrid loss alone). Tasks left out use ``teacher_loss``.
    teacher_by_task: dict[str, TeacherTerms] = Field(default_factory=dict)
    teacher_workers: int = 2  # processes labelling the targets (cached in run_dir, once)


class DistillLoss(TeacherTerms):
    """Distillation loss: match the teacher's fused image and its edges (sharpness: SF/AG/Qabf), plus a little
    of the hybrid loss."""

    hybrid: float = 0.02  # weight of the Stage II hybrid loss (no ground truth), a regulariser
    hybrid_terms: LossWeights = Field(default_factory=lambda: LossWeights(gradient_target="signed"))


class DistillConfig(CommonRun):
    """Fast tier: distil the shipped DM-FNet into the compact network of :mod:`models.nets.fast_net`."""

    stage: Literal["distill"] = "distill"
    teacher: str = "weights/dmfnet_small.pt"  # a weights file (or ``random:CONFIG``, for tests only)
    student: FastConfig = Field(default_factory=FastConfig)
    # Fine-tune: start the student from this fast-tier weights file (the same student config) instead of a random
    # init, e.g. the shipped fast tier when its teacher changed in one task only.
    init_student: Path | None = None
    loss: DistillLoss = Field(default_factory=DistillLoss)
    lr: float = 2e-3
    min_lr: float = 2e-5  # cosine decay from lr to this over max_steps, after warmup_steps
    warmup_steps: int = 100
    teacher_workers: int = 2  # processes labelling the teacher targets (one torch thread each)
    val_pairs_per_task: int = 10
    within: float = 0.03  # validation: a metric "holds" when |student - teacher| <= within x |teacher|


def load_run_config(path: str | Path, cls: type[CommonRun]) -> CommonRun:
    """Read YAML/JSON into the given config class (clear pydantic errors on bad fields)."""
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    return cls.model_validate(data)
