"""Stage I: train the SR3 UNet as a diffusion reconstruction model on single grayscale slices.

Resumable bit-for-bit (model, EMA, optimizer, RNG, step), checkpoints every N steps and on
SIGTERM/SIGINT, CSV log + loss-curve PNG, bf16 autocast, DDP under torchrun (gloo on CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from models.inference.hardware import autocast, resolve_channels_last, resolve_precision
from models.nets.configs import ModelConfig
from models.nets.diffusion import Diffusion
from models.nets.unet import UNet
from models.training.common import EMA, RunLoop, open_run
from models.training.config import Stage1Config
from models.training.data import CropSampler, load_pair_luma, load_split

CHECKPOINT = "checkpoint.pt"


def slice_stack(pairs: list, crop: int) -> np.ndarray:
    """All single-channel slices of the pairs (MRI and functional luminance): (N, 1, H, W)."""
    slices = []
    for p in pairs:
        slices.extend(load_pair_luma(p))
    arr = np.stack(slices)[:, None]
    return arr * 2.0 - 1.0  # the UNet works in [-1, 1]


def _lr(cfg: Stage1Config, step: int) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0))))


@torch.no_grad()
def validate(
    unet: torch.nn.Module, diffusion: Diffusion, val: torch.Tensor, cfg: Stage1Config, device,
    precision: str = "fp32", channels_last: bool = False,
) -> float:
    """Mean Stage I loss on fixed validation crops at fixed noise (comparable across steps)."""
    unet.eval()
    g = torch.Generator().manual_seed(1234)
    losses = []
    for i in range(0, len(val), cfg.batch_size):
        x0 = val[i : i + cfg.batch_size].to(device)
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            losses.append(float(diffusion.stage1_loss(unet, x0, g)) * len(x0))
    unet.train()
    return sum(losses) / len(val)


def train_stage1(cfg: Stage1Config, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) Stage I; returns the checkpoint path."""
    info, run, ckpt_path = open_run(cfg, CHECKPOINT, resume)
    start = ema_unet(cfg.init_unet) if cfg.init_unet is not None else None
    # A continuation is the same model: its whole config (fusion schedule included) comes from where it starts.
    model_cfg = cfg.model_cfg() if start is None else ModelConfig.model_validate(start[1]["model_config"])
    diffusion = Diffusion(model_cfg.diffusion)
    device = info.device
    precision = resolve_precision(cfg.precision, device)
    channels_last = resolve_channels_last(cfg.channels_last, precision)

    torch.manual_seed(cfg.seed + info.rank)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + info.rank)
    unet = UNet(model_cfg.unet).to(device)
    continuing = start is not None and not (resume and ckpt_path.exists())
    if continuing:  # a longer Stage I from an earlier run's EMA UNet (fresh optimiser, warm-up again)
        unet.load_state_dict(start[0].state_dict())
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(unet, cfg.ema_decay)
    loop = RunLoop(cfg, info, run, ckpt_path, "stage1", opt, gen, ["loss", "val_loss", "lr", "steps_per_s", "wall_s"],
                   ["loss", "val_loss"], f"Stage I ({model_cfg.name})")
    if (state := loop.resume(resume)) is not None:
        unet.load_state_dict(state["unet"])
        ema.shadow = state["ema"]
    model = DDP(unet) if info.world > 1 else unet

    split = load_split(cfg.data.root, cfg.data.split_file)
    train = CropSampler(slice_stack(split["train"], cfg.data.crop).astype(np.float32), cfg.data.crop)
    val_src = CropSampler(slice_stack(split["val"], cfg.data.crop).astype(np.float32), cfg.data.crop)
    val = val_src.sample(cfg.data.val_crops, torch.Generator().manual_seed(99))

    def train_step() -> tuple[torch.Tensor, dict]:
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, loop.step)
        x0 = train.sample(cfg.batch_size, gen).to(device)
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            loss = diffusion.stage1_loss(model, x0, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(unet)
        return loss, {}

    def validate_ema() -> dict:
        ema_net = UNet(model_cfg.unet).to(device)
        ema_net.load_state_dict(ema.shadow)
        return {"val_loss": validate(ema_net, diffusion, val, cfg, device, precision, channels_last)}

    model.train()
    if continuing and info.is_main:
        loop.log_row(0, 0.0, validate_ema())  # where it starts, on the same validation crops
    loop.run(train_step, validate_ema, lambda: {"model_config": model_cfg.model_dump(mode="json"),
                                                "unet": unet.state_dict(), "ema": ema.shadow}, progress)
    return ckpt_path


def ema_unet(checkpoint: Path) -> tuple[UNet, dict]:
    """The EMA UNet of a Stage I checkpoint (what Stage II and the shipped weights use)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    unet = UNet(ModelConfig.model_validate(state["model_config"]).unet)
    unet.load_state_dict(state["ema"])
    return unet, state
