"""Fit the Stage II intensity target's tone curve for one task, as a fusion rule on its own.

The intensity term of the hybrid loss pulls the fused luminance toward a target computed from the sources
(models.nets.losses.IntensityTarget: soft maximum, S-curve, gain, knee; the defaults are the plain max). This
script asks which of those curves, applied alone as a fusion rule, beats the four classical baselines by the
widest margin on the chosen metrics; Nelder-Mead on training pairs only, then the same numbers on the
validation split (which the fit never sees). Its output is a starting point for ``loss_by_task`` in a Stage II
config: the head then learns its own version of the curve together with the gradient and SSIM terms.

    .venv/bin/python scripts/history/intensity_target_fit.py --task MRI-CT [--pairs-used 12] [--evals 150]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy import optimize

from models.evaluation.baselines import BASELINES
from models.evaluation.metrics import QUALITY_METRICS, score_pair
from models.evaluation.report import best_baseline, load_prepared, select_split, summarize, wins_against_baselines
from models.images.pairs import discover_pairs
from models.nets.losses import IntensityTarget, intensity_target

FIELDS = ("softness", "s_curve", "gain", "knee")


def load(pairs: list) -> tuple[list[tuple], list[dict]]:
    """(pair, MRI Y, other Y) per pair, and the baselines' metric rows for all of them."""
    data, baseline_rows = [], []
    for p in pairs:
        prepared = load_prepared(p)
        a, b = prepared.mri_y.astype(np.float64), prepared.func_y.astype(np.float64)
        data.append((p, a, b))
        baseline_rows += score_pair(p.task, p.pair_id, a, b, {n: fn(a, b) for n, fn in BASELINES.items()})
    return data, baseline_rows


def rule(a: np.ndarray, b: np.ndarray, target: IntensityTarget) -> np.ndarray:
    """The intensity target as a fusion rule (float64 in, float64 out)."""
    return intensity_target(torch.from_numpy(a), torch.from_numpy(b), target).numpy()


def summary_with_rule(loaded: tuple[list[tuple], list[dict]], target: IntensityTarget) -> dict:
    """``report.summarize`` of the baselines and the rule (method "rule") over the loaded pairs."""
    data, baseline_rows = loaded
    rows = [r for p, a, b in data for r in score_pair(p.task, p.pair_id, a, b, {"rule": rule(a, b, target)})]
    return summarize(baseline_rows + rows)


def as_target(x: np.ndarray) -> IntensityTarget:
    """Nelder-Mead's vector -> a valid IntensityTarget (clipped into the fields' ranges)."""
    softness, s_curve, gain, knee = x
    return IntensityTarget(softness=max(float(softness), 0.1), s_curve=float(np.clip(s_curve, -1, 1)),
                           gain=max(float(gain), 0.1), knee=float(np.clip(knee, 0.05, 0.999)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="../shared/data/harvard")
    ap.add_argument("--split-file", default="configs/harvard_split.json")
    ap.add_argument("--task", default="MRI-CT")
    ap.add_argument("--metrics", default="SD,SF,MI,SCD,SSIM", help="metrics to win, comma-separated")
    ap.add_argument("--margin", type=float, default=0.015, help="aim this far above the best baseline")
    ap.add_argument("--pairs-used", type=int, default=12, help="training pairs used by the fit (evenly spaced)")
    ap.add_argument("--evals", type=int, default=150, help="Nelder-Mead function evaluations")
    ap.add_argument("--start", default="4,0.5,1.2,0.95", help="softness,s_curve,gain,knee to start from")
    args = ap.parse_args()
    everything = discover_pairs(args.pairs)
    split = Path(args.split_file)
    train = [p for p in select_split(everything, "train", split) if p.task == args.task]
    train = train[:: max(1, len(train) // args.pairs_used)][: args.pairs_used]
    val = [p for p in select_split(everything, "val", split) if p.task == args.task]
    wanted = args.metrics.split(",")
    unknown = set(wanted) - set(QUALITY_METRICS)
    if unknown:
        ap.error(f"--metrics: unknown {sorted(unknown)}; choose from {','.join(QUALITY_METRICS)}")
    fit_data = load(train)

    def objective(x: np.ndarray) -> float:
        summary = summary_with_rule(fit_data, as_target(x))
        mean, best = summary["rule"][args.task], best_baseline(summary, args.task)
        return float(sum(max(0.0, 1 + args.margin - mean[m] / best[m]) for m in wanted))

    x0 = np.array([float(v) for v in args.start.split(",")])
    res = optimize.minimize(objective, x0, method="Nelder-Mead", options={"maxfev": args.evals})
    target = as_target(res.x)
    print(f"{args.task}: fitted on {len(train)} training pairs; intensity_target: "
          + "{" + ", ".join(f"{f}: {getattr(target, f):.3g}" for f in FIELDS) + "}")
    for name, loaded in (("train (fit)", fit_data), ("validation", load(val))):
        summary = summary_with_rule(loaded, target)
        mean, best = summary["rule"][args.task], best_baseline(summary, args.task)
        won = wins_against_baselines(summary, "rule")[args.task]
        print(f"{name:<12} {len(loaded[0]):3d} pairs, wins {len(won)} ({' '.join(won)}): "
              + " ".join(f"{m} {mean[m]:.3f}/{best[m]:.3f}" for m in QUALITY_METRICS))


if __name__ == "__main__":
    main()
