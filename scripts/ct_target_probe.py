"""Which simple images meet the quality round's MRI-CT target? (a probe for #46; nothing here ships)

    python scripts/ct_target_probe.py [--weights full] [--out runs/ct_target_probe.csv]

Scores, on the MRI-CT validation pairs, the family usm(alpha * model + (1 - alpha) * max(MRI, CT), sigma, amount)
(usm: unsharp mask, the local-contrast target of ``IntensityTarget.unsharp``) with the project's metrics, and
prints per candidate the wins against each peer (../shared/notes/peer-scores-val.md) and against both baselines,
SSIM and Speckle, marking those that meet the target: every peer beaten on >= 6 of 9, both baselines on >= 5,
SSIM >= v5's 1.507 - 0.01 and Speckle <= v5's 2.53. It tells a training run what image to aim for, and whether
any such image exists at all.
"""

from __future__ import annotations

import argparse
import csv
import itertools
from pathlib import Path

import numpy as np
from peer_wins import PEERS, peer_tables, wins
from scipy import ndimage

from models.evaluation.metrics import SourceStats, all_metrics
from models.evaluation.report import delivered_luma, load_prepared, select_split
from models.images.pairs import discover_pairs
from models.inference.weights import open_pipeline

ROOT = Path(__file__).resolve().parent.parent
SSIM_FLOOR, SPECKLE_CEILING = 1.507 - 0.01, 2.53  # v5 on MRI-CT (weights/README.md)
METRICS = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "Speckle")


def usm(f: np.ndarray, sigma: float, amount: float) -> np.ndarray:
    """Unsharp mask of f in [0, 1] (scipy's mirror Gaussian, as the training target's), clipped to [0, 1]."""
    if amount == 0:
        return f
    return np.clip(f + amount * (f - ndimage.gaussian_filter(f, sigma, mode="mirror", truncate=3.0)), 0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="full", help="model whose output is blended (a tier or a weights file)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/ct_target_probe.csv")
    args = ap.parse_args()
    pairs = discover_pairs(ROOT.parent / "shared/data/harvard")
    val = select_split(pairs, "val", ROOT / "configs/harvard_split.json")
    inputs = [load_prepared(p) for p in val if p.task == "MRI-CT"]
    model = [delivered_luma(r.pixels) for r in open_pipeline(args.weights).fuse(inputs)]
    peers = peer_tables((ROOT.parent / "shared/notes/peer-scores-val.md").read_text())["MRI-CT"]
    # Per pair, once: the sources' statistics and their max (every candidate reuses them).
    sources = [(inp.mri_y.astype(np.float64), inp.func_y.astype(np.float64)) for inp in inputs]
    stats = [SourceStats(a * 255, b * 255) for a, b in sources]
    maxima = [np.maximum(a, b) for a, b in sources]
    rows = []
    for alpha, sigma, amount in itertools.product((0, 0.25, 0.5, 0.75, 1), (1, 2, 3), (0, 0.2, 0.35, 0.5)):
        if amount == 0 and sigma != 1:
            continue  # no sharpening: sigma does not matter
        scores = []
        for f, m, st in zip(model, maxima, stats, strict=True):
            image = usm(alpha * f + (1 - alpha) * m, sigma, amount)
            scores.append(all_metrics(st.a, st.b, image * 255, st))
        mean = {m: float(np.mean([s[m] for s in scores])) for m in METRICS}
        per_peer = [len(wins(mean, [peers[p]])) for p in PEERS]
        baselines = len(wins(mean, [peers["average"], peers["max"]]))
        meets = min(per_peer) >= 6 and baselines >= 5 and mean["SSIM"] >= SSIM_FLOOR
        meets = meets and mean["Speckle"] <= SPECKLE_CEILING
        rows.append({"alpha": alpha, "sigma": sigma, "amount": amount, **{m: round(v, 4) for m, v in mean.items()},
                     "peer_wins": "/".join(map(str, per_peer)), "baselines": baselines, "meets": meets})
        print(f"alpha {alpha} sigma {sigma} amount {amount}: peers {per_peer} baselines {baselines} SSIM "
              f"{mean['SSIM']:.3f} Speckle {mean['Speckle']:.2f} SF {mean['SF']:.1f}{'  MEETS' if meets else ''}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{sum(r['meets'] for r in rows)} of {len(rows)} candidates meet the target; table: {args.out}")


if __name__ == "__main__":
    main()
