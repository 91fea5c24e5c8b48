"""Shared training plumbing: distributed set-up, signals, atomic checkpoints, EMA, CSV log, plots."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


class StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then checkpoints and exits)."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        """Put the previous handlers back."""
        for s, h in self._old.items():
            signal.signal(s, h)


class DistInfo:
    """Rank/world size from torchrun's environment; initialises gloo (CPU) or NCCL (CUDA)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, plots and the shared checkpoint."""
        return self.rank == 0

    def barrier(self) -> None:
        """Synchronise ranks (no-op for a single process)."""
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Tear down the process group."""
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU (AMX) and CUDA, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file then rename, so a kill never leaves a half-written checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class EMA:
    """Exponential moving average of parameters (buffers copied)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """shadow = decay * shadow + (1 - decay) * current."""
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(self.decay).add_(v.detach().float(), alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Everything random that the loop consumes, for bit-for-bit resume."""
    return {"torch": torch.get_rng_state(), "generator": generator.get_state()}


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])


class CsvLog:
    """Appends rows to ``log.csv``; columns fixed by the first row written (resume-safe)."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        self.columns = columns
        if not path.exists():
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(columns)

    def write(self, **row: Any) -> None:
        """Append one row; missing columns stay empty."""
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c)) for c in self.columns])

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint's step (they will be re-done)."""
        with self.path.open() as f:
            rows = list(csv.reader(f))
        keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        with self.path.open("w", newline="") as f:
            csv.writer(f).writerows(keep)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def plot_log(csv_path: Path, png_path: Path, keys: list[str], title: str) -> None:
    """Loss-curve PNG from the CSV log (one panel per key that has values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in keys if any(r.get(k) for r in rows)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(int(r["step"]), float(r[k])) for r in rows if r.get(k)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(k)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


class Throughput:
    """Steps per second over the recent window."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.n = 0

    def tick(self) -> None:
        """Count one step."""
        self.n += 1

    def rate(self) -> float:
        """Steps/s since the last call; resets the window."""
        now = time.perf_counter()
        r = self.n / max(now - self.t0, 1e-9)
        self.t0, self.n = now, 0
        return r


def open_run(cfg, checkpoint_name: str, resume: bool) -> tuple[DistInfo, Path, Path]:
    """Start a stage: process group, threads, run folder; refuses to overwrite a run unless resuming."""
    info = DistInfo()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    ckpt_path = run / checkpoint_name
    if ckpt_path.exists() and not resume:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it or choose another run_dir")
    return info, run, ckpt_path
