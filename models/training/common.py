"""Shared training plumbing: the run loop, distributed set-up, signals, atomic checkpoints, EMA, CSV log, plots."""

from __future__ import annotations

import csv
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from models.evaluation.metrics import METRICS

TASKS = ("MRI-CT", "MRI-PET", "MRI-SPECT")


def metric_columns() -> list[str]:
    """CSV log columns for per-task validation metrics (``MRI-CT_EN``, ...)."""
    return [f"{t}_{m}" for t in TASKS for m in METRICS]


def metric_row(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """One summary's per-task means as log columns (see :func:`metric_columns`)."""
    return {f"{t}_{m}": s[m] for t, s in per_task.items() for m in METRICS}


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
    """Appends rows to ``log.csv``; columns fixed by the header written first (resume-safe: a run resumed by a
    version that logs other columns keeps the file's own, so no row lands under another column's name)."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        header = None
        if path.exists():
            with path.open(newline="") as f:
                header = next(csv.reader(f), None)
        self.columns = header or columns
        if not header:
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


def mean_parts(parts: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each loss part over the steps that have it: a term of one task's loss (``loss_by_task``) is
    missing from a step whose batch held none of that task's crops."""
    keys = dict.fromkeys(k for p in parts for k in p)
    return {k: float(np.mean([p[k] for p in parts if k in p])) for k in keys}


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


class RunLoop:
    """The loop both stages share: step and wall time, optimiser and RNG state, CSV log and loss curve,
    validation and checkpoint cadence, stop on SIGTERM/SIGINT, bit-for-bit resume.

    A stage builds its networks, calls :meth:`resume` (which restores the shared parts and hands back the
    checkpoint for the stage's own), then :meth:`run` with three callables: ``train_step()`` -> (loss,
    {part: value}), ``validate()`` -> columns to log (empty where this rank does not validate) and
    ``state()`` -> the stage's own checkpoint entries.
    """

    def __init__(self, cfg: Any, info: DistInfo, run_dir: Path, ckpt_path: Path, stage: str,
                 optimizer: torch.optim.Optimizer, generator: torch.Generator, columns: list[str],
                 plot_keys: list[str], title: str) -> None:
        self.cfg, self.info, self.run_dir, self.ckpt_path, self.stage = cfg, info, run_dir, ckpt_path, stage
        self.opt, self.gen = optimizer, generator
        self.columns, self.plot_keys, self.title = columns, plot_keys, title
        self.step, self.wall = 0, 0.0
        self.log = CsvLog(run_dir / "log.csv", ["step", *columns]) if info.is_main else None

    def resume(self, resume: bool) -> dict[str, Any] | None:
        """When resuming from an existing checkpoint: restore optimiser, step, wall time and RNG streams, drop log
        rows past the checkpoint, and return the checkpoint (the stage restores its networks from it)."""
        if not (resume and self.ckpt_path.exists()):
            return None
        state = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.wall = state["step"], state["wall_s"]
        rng_file = self.run_dir / f"rng_rank{self.info.rank}.pt"
        set_rng_state(torch.load(rng_file, weights_only=False) if self.info.world > 1 else state["rng"], self.gen)
        if self.log:
            self.log.truncate_after(self.step)
        return state

    def checkpoint(self, own: dict[str, Any]) -> None:
        """Write the checkpoint atomically (rank 0; every rank its RNG streams under torchrun)."""
        state = {"stage": self.stage, "step": self.step, "wall_s": self.wall,
                 "config": self.cfg.model_dump(mode="json"), **own, "optimizer": self.opt.state_dict(),
                 "rng": rng_state(self.gen)}
        if self.info.world > 1:
            atomic_save(rng_state(self.gen), self.run_dir / f"rng_rank{self.info.rank}.pt")
        if self.info.is_main:
            atomic_save(state, self.ckpt_path)

    def log_row(self, step: int, wall_s: float, row: dict[str, Any]) -> None:
        """Append one row to the CSV log (rank 0)."""
        if row and self.log:
            self.log.write(step=step, wall_s=round(wall_s, 1), **row)

    def run(self, train_step: Callable[[], tuple[torch.Tensor, dict[str, float]]],
            validate: Callable[[], dict[str, Any]], state: Callable[[], dict[str, Any]], progress: bool) -> None:
        """Train until ``max_steps`` or a stop signal; log, validate and checkpoint on the configured cadence."""
        cfg = self.cfg
        stop, meter = StopFlag(), Throughput()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (progress and self.info.is_main),
                   desc=self.stage, unit="step")
        t_last = time.perf_counter()
        running: list[tuple[float, dict[str, float]]] = []
        while self.step < cfg.max_steps and not stop.requested:
            loss, parts = train_step()
            self.step += 1
            now = time.perf_counter()
            self.wall += now - t_last
            t_last = now
            meter.tick()
            running.append((loss.item(), parts))
            bar.update(1)
            row: dict[str, Any] = {}
            if self.step % cfg.log_every == 0:
                row = {"loss": float(np.mean([r[0] for r in running])), "steps_per_s": meter.rate()}
                row.update(mean_parts([r[1] for r in running]))
                if "lr" in self.columns:
                    row["lr"] = self.opt.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{row['steps_per_s']:.2f}")
                running = []
            if self.step % cfg.val_every == 0 or self.step == cfg.max_steps:
                row.update(validate())
            self.log_row(self.step, self.wall, row)
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps:
                self.checkpoint(state())
                if self.log:
                    plot_log(self.run_dir / "log.csv", self.run_dir / "loss.png", self.plot_keys, self.title)
            t_last = time.perf_counter()  # checkpoint/validation time is not training time
        if stop.requested:
            self.checkpoint(state())
            bar.write(f"stopped by signal at step {self.step}; checkpoint saved to {self.ckpt_path}")
        bar.close()
        stop.restore()
        self.info.barrier()
        self.info.close()
