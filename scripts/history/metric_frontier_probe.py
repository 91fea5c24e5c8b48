"""How many metrics can any fused image win against the four baselines? A probe for the quality bar.

For validation pairs of one task it scores the baselines, a few hand-made natural variants (`max` plus
unsharp masking, a Laplacian pyramid with a `max` base), and an "oracle": each fused image optimised
directly (Adam on the pixels, starting from `max`) to beat the best baseline by 3% on SD, SF, AG, SCD and
SSIM — the five metrics with simple differentiable forms. It prints the mean of every metric and the
metrics won against every baseline, and the Speckle check (detail no mix of the sources explains; 8 MRI-CT
pairs: oracle 4.7, max 0.4, average 0.0, max + unsharp mask 2.4-4.8, Laplacian 6.5); ``--sheet`` saves
sources | max | laplacian | oracle of one pair, so one can see what the oracle had to do to win.

    .venv/bin/python scripts/history/metric_frontier_probe.py --task MRI-CT [--every 3] [--iters 300] [--sheet out.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from models.evaluation.baselines import BASELINES, laplacian, maximum
from models.evaluation.metrics import QUALITY_METRICS, score_pair
from models.evaluation.report import load_prepared, select_split, summarize, wins_against_baselines
from models.images.pairs import discover_pairs
from models.nets.losses import ssim


def unsharp(x: np.ndarray, amount: float, sigma: float = 1.0) -> np.ndarray:
    """x + amount * (x - blur(x)), clipped to [0, 1]."""
    return np.clip(x + amount * (x - ndimage.gaussian_filter(x, sigma)), 0, 1)


def differentiable_metrics(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """SD, SF, AG, SCD, SSIM of F with the definitions of models/evaluation/metrics.py (0-255 scale)."""
    fa, aa, ba = f * 255, a * 255, b * 255
    sd = fa.std(unbiased=False)
    sf = torch.sqrt(((fa[:, 1:] - fa[:, :-1]) ** 2).mean() + ((fa[1:] - fa[:-1]) ** 2).mean())
    dx, dy = fa[:-1, 1:] - fa[:-1, :-1], fa[1:, :-1] - fa[:-1, :-1]
    ag = torch.sqrt((dx**2 + dy**2) / 2 + 1e-8).mean()

    def corr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x - x.mean(), y - y.mean()
        return (x * y).sum() / torch.sqrt((x * x).sum() * (y * y).sum())

    scd = corr(fa - ba, aa) + corr(fa - aa, ba)
    s = ssim(f[None, None], a[None, None]) + ssim(f[None, None], b[None, None])
    return torch.stack([sd, sf, ag, scd, s.squeeze()])


def oracle(a: np.ndarray, b: np.ndarray, baselines: dict[str, np.ndarray], iters: int) -> np.ndarray:
    """Pixels optimised to beat the best baseline by 3% on SD, SF, AG, SCD and SSIM."""
    ta, tb = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    target = torch.stack([differentiable_metrics(ta, tb, torch.tensor(v, dtype=torch.float32))
                          for v in baselines.values()]).max(0).values
    f = torch.tensor(np.maximum(a, b), dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([f], lr=0.005)
    for _ in range(iters):
        loss = torch.relu(1.03 - differentiable_metrics(ta, tb, f.clamp(0, 1)) / target).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return f.detach().clamp(0, 1).numpy().astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="../shared/data/harvard")
    ap.add_argument("--split-file", default="configs/harvard_split.json")
    ap.add_argument("--task", default="MRI-CT")
    ap.add_argument("--every", type=int, default=3, help="use every k-th validation pair")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--sheet", type=Path, default=None)
    args = ap.parse_args()
    pairs = [p for p in select_split(discover_pairs(args.pairs), "val", Path(args.split_file))
             if p.task == args.task][:: args.every]
    variants = {"max+unsharp0.5": lambda a, b: unsharp(np.maximum(a, b), 0.5),
                "max+unsharp1": lambda a, b: unsharp(np.maximum(a, b), 1.0),
                "laplacian, max base": lambda a, b: laplacian(a, b, base=maximum)}
    rows: list[dict] = []
    for k, p in enumerate(pairs):
        prepared = load_prepared(p)
        a, b = prepared.mri_y.astype(np.float64), prepared.func_y.astype(np.float64)
        fused = {name: fn(a, b) for name, fn in BASELINES.items()}
        fused.update({name: fn(a, b) for name, fn in variants.items()})
        fused["oracle"] = oracle(a, b, {n: fused[n] for n in BASELINES}, args.iters)
        if args.sheet and k == 0:
            row = np.hstack([a, b, fused["max"], fused["laplacian"], fused["oracle"]])
            Image.fromarray((row * 255).round().astype(np.uint8)).save(args.sheet)
        rows += score_pair(p.task, p.pair_id, a, b, fused)
    summary = summarize(rows)
    print(f"{args.task}: {len(pairs)} validation pairs; metrics won against every baseline")
    print(f"{'method':<20}" + "".join(f"{m:>8}" for m in QUALITY_METRICS) + "  Speckle wins")
    for name in [*BASELINES, *variants, "oracle"]:
        mean = summary[name][args.task]
        won = wins_against_baselines(summary, name)[args.task]
        print(f"{name:<20}" + "".join(f"{mean[m]:8.3f}" for m in QUALITY_METRICS)
              + f" {mean['Speckle']:7.3f} {len(won)} {' '.join(won)}")


if __name__ == "__main__":
    main()
