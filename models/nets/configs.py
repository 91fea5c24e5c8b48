"""Named, pydantic-validated model configurations (``paper`` and the compact CPU ``small``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class UNetConfig(BaseModel):
    """SR3-style UNet hyper-parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_channel: int = 1
    out_channel: int = 1
    inner_channel: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 1, 1, 2)
    attn_res: tuple[int, ...] = (16,)
    # The reference decides where self-attention goes from a static size ladder that starts at
    # ``image_size`` (160 in its configs), so ``attn_res=[16]`` never matches and attention runs only
    # in the middle block. Keeping the ladder keeps that behaviour (and the weights' layout) explicit.
    image_size: int = 160
    res_blocks: int = 2
    dropout: float = 0.2
    norm_groups: int = 32
    # The reference's fusion-time UNet has no noise-level embedding: features depend on t only
    # through the noise that was added.
    with_noise_level_emb: bool = False

    @model_validator(mode="after")
    def _check_groups(self) -> UNetConfig:
        for m in self.channel_multiplier:
            if (self.inner_channel * m) % self.norm_groups:
                raise ValueError(
                    f"inner_channel*{m}={self.inner_channel * m} is not divisible by norm_groups={self.norm_groups}"
                )
        return self

    @property
    def levels(self) -> int:
        """Number of resolution levels (the coarsest is 1/2**(levels-1))."""
        return len(self.channel_multiplier)

    @property
    def size_multiple(self) -> int:
        """Input height and width must be a multiple of this (pipeline pads to it)."""
        return 2 ** (self.levels - 1)


class DiffusionConfig(BaseModel):
    """Noise schedule and Stage I objective."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schedule: Literal["linear", "cosine"] = "linear"
    n_timestep: int = 2000
    linear_start: float = 1e-6
    linear_end: float = 1e-2
    # Reference: the UNet reconstructs the clean image x0 ("x0"); "eps" is classic noise prediction.
    objective: Literal["x0", "eps"] = "x0"
    loss: Literal["l1", "l2"] = "l1"


class FusionConfig(BaseModel):
    """Stage II: which timesteps and decoder scales feed the fusion head, and its width."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timesteps: tuple[int, ...] = (5, 10, 20)
    # Decoder levels whose features are used: 0 = full resolution, 1 = 1/2, ... (reference: all five).
    scales: tuple[int, ...] = (0, 1, 2, 3, 4)
    head_channels: int = 64
    # Deterministic inference: the noise for each (modality, timestep) comes from this seed.
    noise_seed: int = 0
    # The reference draws fresh noise on every call; set True to reproduce that (non-deterministic).
    fresh_noise: bool = False
    # Run the UNet at this one timestep and give its features to every timestep slot of the head. The
    # features of t = 5, 10, 20 differ by <= 1.8% (relative L2, bench/schedules.py), and the UNet passes are
    # ~95% of the work: a third of the UNet passes for the same head.
    reuse_timestep: int | None = None
    # What the head predicts. "luma": the fused luminance itself (the paper's conv + tanh). "mix": a per-pixel
    # weight w and a residual r, fused = w * MRI + (1 - w) * other + r (the fast tier's output form: edges then
    # come from a mix of the sources' edges by construction, which the Speckle metric, MI and VIF reward).
    # "mix_gain": the mix m plus a per-pixel gain k on its own local contrast, fused = m + k (m - G * m) + r
    # (G a Gaussian of ``gain_sigma`` px; #46: only local-contrast sharpening reaches the sharpest peer's detail
    # on MRI-CT, and a global unsharp mask amplifies CT noise in flat tissue; a learned k can keep it to edges).
    output: Literal["luma", "mix", "mix_gain"] = "luma"
    gain_sigma: float = Field(2.0, gt=0.0, le=4.0)

    @model_validator(mode="after")
    def _check_reuse(self) -> FusionConfig:
        if self.reuse_timestep is not None and self.reuse_timestep not in self.timesteps:
            raise ValueError(f"reuse_timestep {self.reuse_timestep} is not one of timesteps {self.timesteps}")
        return self

    @property
    def unet_timesteps(self) -> tuple[int, ...]:
        """The timesteps the UNet actually runs at (one when ``reuse_timestep`` is set)."""
        return (self.reuse_timestep,) if self.reuse_timestep is not None else self.timesteps


class ModelConfig(BaseModel):
    """Everything needed to build the networks; stored inside every weights file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "paper"
    unet: UNetConfig = Field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)

    @model_validator(mode="after")
    def _check_scales(self) -> ModelConfig:
        bad = [s for s in self.fusion.scales if not 0 <= s < self.unet.levels]
        if bad:
            raise ValueError(f"fusion.scales {bad} outside the UNet's {self.unet.levels} levels")
        bad_t = [t for t in self.fusion.timesteps if not 0 <= t < self.diffusion.n_timestep]
        if bad_t:
            raise ValueError(f"fusion.timesteps {bad_t} outside [0, {self.diffusion.n_timestep})")
        return self


PAPER = ModelConfig(name="paper")

# Compact configuration sized for training and serving on a 2-core CPU (see weights/README.md).
SMALL = ModelConfig(
    name="small",
    unet=UNetConfig(
        inner_channel=32,
        channel_multiplier=(1, 2, 2, 4, 4),
        attn_res=(16,),
        image_size=128,
        res_blocks=1,
        dropout=0.1,
        norm_groups=16,
    ),
    fusion=FusionConfig(head_channels=32),
)

# Minimal configuration for tests and CI smoke runs only.
TINY = ModelConfig(
    name="tiny",
    unet=UNetConfig(
        inner_channel=8,
        channel_multiplier=(1, 2, 2),
        attn_res=(),
        image_size=32,
        res_blocks=1,
        dropout=0.0,
        norm_groups=4,
    ),
    fusion=FusionConfig(timesteps=(5, 20), scales=(0, 1, 2), head_channels=8),
)

CONFIGS: dict[str, ModelConfig] = {c.name: c for c in (PAPER, SMALL, TINY)}


def get_config(name: str) -> ModelConfig:
    """Return a named configuration or raise ``KeyError`` listing the known names."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown model config {name!r}; known: {sorted(CONFIGS)}") from None
