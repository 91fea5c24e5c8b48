"""Cheaper DM-FNet schedules, measured: how alike the UNet features of the fusion timesteps are, and what
fewer timesteps cost in quality and buy in speed.

    python bench/schedules.py similarity [--per-task 4]
        per decoder scale: cosine similarity and relative L2 difference of the features of t = 5, 10, 20
        (the same image, the pipeline's fixed noise), on validation pairs
    python bench/schedules.py compare NAME=WEIGHTS[@reuse:T] ... [--size 256] [--per-task N]
        GFLOP and s/pair at --size, and the nine metrics on the validation split, side by side in one run;
        ``@reuse:T`` runs the head on the features of timestep T given to every timestep slot
        (``FusionConfig.reuse_timestep``: one UNet pass per image instead of three, no retraining);
        ``@reuse:none`` runs every timestep (v3's schedule). The study behind v4:
        ``compare v3=@reuse:none t10=@reuse:10 t5=@reuse:5``

Prints tables and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from models.evaluation.metrics import QUALITY_METRICS
from models.evaluation.report import evaluate, load_prepared, summarize
from models.images.pairs import spread_per_task
from models.images.phantoms import phantom_inputs
from models.inference.pipeline import FusionPipeline
from models.inference.weights import open_pipeline
from models.training.data import load_split

ROOT = Path(__file__).resolve().parent.parent
HARVARD = ROOT.parent / "shared" / "data" / "harvard"
SPLIT = ROOT / "configs" / "harvard_split.json"


def _val(per_task: int | None) -> list:
    val = load_split(HARVARD, SPLIT)["val"]
    return spread_per_task(val, per_task) if per_task else val


def similarity(per_task: int) -> dict:
    """Per scale and timestep pair: mean cosine similarity and relative L2 difference of UNet features."""
    pipe = _open("@reuse:none")  # every timestep through the UNet, whatever the shipped schedule
    steps = pipe.cfg.fusion.timesteps
    stats: dict[str, dict[str, list[float]]] = {}
    for p in _val(per_task):
        inp = load_prepared(p)
        a = torch.from_numpy(inp.mri_y)[None, None]
        b = torch.from_numpy(inp.func_y)[None, None]
        fa, fb = pipe.features(a, b)
        for s, f in {**{("mri", k): v for k, v in fa.items()}, **{("other", k): v for k, v in fb.items()}}.items():
            per_t = f[0].reshape(len(steps), -1)  # timesteps are concatenated on channels
            for i in range(len(steps)):
                for j in range(i + 1, len(steps)):
                    key = f"scale {s[1]} t{steps[i]}-t{steps[j]}"
                    x, y = per_t[i], per_t[j]
                    cos = float(torch.nn.functional.cosine_similarity(x, y, dim=0))
                    rel = float((x - y).norm() / x.norm().clamp_min(1e-12))
                    stats.setdefault(key, {"cos": [], "rel_l2": []})
                    stats[key]["cos"].append(cos)
                    stats[key]["rel_l2"].append(rel)
    out = {k: {m: round(float(np.mean(v)), 5) for m, v in d.items()} for k, d in sorted(stats.items())}
    print(f"{'features':<24} {'cosine':>8} {'rel. L2':>8}")
    for k, d in out.items():
        print(f"{k:<24} {d['cos']:>8.4f} {d['rel_l2']:>8.4f}")
    return out


def _open(spec: str) -> FusionPipeline:
    weights, _, variant = spec.partition("@")
    pipe = open_pipeline(weights or None, "cpu")
    if variant.startswith("reuse:"):  # the head on one timestep's features (FusionConfig.reuse_timestep)
        t = variant.split(":")[1]
        fusion = pipe.cfg.fusion.model_copy(update={"reuse_timestep": None if t == "none" else int(t)})
        pipe.cfg = pipe.cfg.model_copy(update={"fusion": fusion})
    return pipe


def _speed(pipe: FusionPipeline, size: int) -> tuple[float, float]:
    from torch.utils.flop_counter import FlopCounterMode

    pairs = phantom_inputs(1, size)
    counter = FlopCounterMode(display=False)
    with counter:
        pipe.fuse(pairs)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        pipe.fuse(pairs)
        best = min(best, time.perf_counter() - t0)
    return counter.get_total_flops() / 1e9, best


def compare(specs: list[str], size: int, per_task: int | None) -> dict:
    """GFLOP, s/pair and validation metrics of each variant, with each metric relative to the first."""
    pairs = _val(per_task)
    out: dict[str, dict] = {}
    for spec in specs:
        name, _, weights = spec.partition("=")
        pipe = _open(weights)
        gflop, s = _speed(pipe, size)
        rows, _ = evaluate(pairs, ["model"], pipe, progress=False)
        out[name] = {"gflop": round(gflop, 2), "s_per_pair": round(s, 3), "summary": summarize(rows)["model"]}
        print(f"{name}: {gflop:.1f} GFLOP, {s:.2f} s/pair at {size} px", flush=True)
    first = next(iter(out.values()))["summary"]
    for task in first:
        print(f"\n{task} ({first[task]['n']} validation pairs), change vs {specs[0].split('=')[0]}")
        print(f"{'variant':<14} {'GFLOP':>6} {'s/pair':>7} " + " ".join(f"{m:>7}" for m in QUALITY_METRICS))
        for name, d in out.items():
            s = d["summary"][task]
            rel = [100 * (s[m] - first[task][m]) / abs(first[task][m]) for m in QUALITY_METRICS]
            print(f"{name:<14} {d['gflop']:>6.1f} {d['s_per_pair']:>7.2f} " + " ".join(f"{r:>+6.1f}%" for r in rel))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("similarity")
    s.add_argument("--per-task", type=int, default=4)
    v = sub.add_parser("compare")
    v.add_argument("specs", nargs="+", help="NAME=WEIGHTS[@reuse:T] (empty WEIGHTS: shipped)")
    v.add_argument("--size", type=int, default=256)
    v.add_argument("--per-task", type=int, default=None, help="validation pairs per task (default: all)")
    args = ap.parse_args()
    if args.cmd == "similarity":
        doc = similarity(args.per_task)
    else:
        doc = compare(args.specs, args.size, args.per_task)
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
