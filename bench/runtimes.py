"""Runtimes side by side: torch eager vs the exported ONNX graph on ONNX Runtime and OpenVINO (fp32), and ONNX
Runtime int8 (static QDQ, calibrated on training pairs) for the fast tier, for both tiers, in one run.

    python bench/runtimes.py [--tiers full,fast] [--sizes 256,512] [--repeats 2] [--quick]

For every tier x runtime: s/pair and pairs/s at each size (the whole pipeline: padding, tiling, colour),
and the mean |runtime - torch| of the fused images on validation pairs (0-255 scale). int8 is reported with
the nine quality metrics against the fp32 model (within 3% on how many of 9 per task), since a runtime that
is faster but changes the image is no option. Prints a table and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from models.evaluation.metrics import score_pair
from models.evaluation.report import delivered_luma, load_prepared, summarize
from models.images.pairs import spread_per_task
from models.images.phantoms import phantom_inputs
from models.inference.runtimes import exported_graph, onnxruntime_graph, use_runtime
from models.inference.weights import open_pipeline
from models.training.data import load_split
from models.training.distill import held_metrics

ROOT = Path(__file__).resolve().parent.parent
HARVARD = ROOT.parent / "shared" / "data" / "harvard"
SPLIT = ROOT / "configs" / "harvard_split.json"


def _pairs(split: str, per_task: int) -> tuple[list, list]:
    """(pair files, prepared inputs) of a split; phantoms (no files) without the data."""
    if not HARVARD.is_dir():
        return [], phantom_inputs(per_task, 256, "pet") + phantom_inputs(per_task, 256, "ct")
    files = spread_per_task(load_split(HARVARD, SPLIT)[split], per_task)
    return files, [load_prepared(p) for p in files]


def _time_per_pair(pipe, size: int, repeats: int) -> float:
    n = 8 if pipe.model_name == "dmfnet-fast" and size <= 256 else 1
    pairs = phantom_inputs(n, size)
    pipe.fuse(pairs)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        pipe.fuse(pairs)
        best = min(best, time.perf_counter() - t0)
    return best / n


def _int8_graph(pipe, folder: Path, calibration: list):
    """ONNX Runtime static int8 (QDQ, per-channel weights) of the pipeline's graph, calibrated on real pairs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{k: v.numpy() for k, v in pipe.graph_feeds(
                torch.from_numpy(p.mri_y)[None, None], torch.from_numpy(p.func_y)[None, None]).items()}
                for p in calibration])

        def get_next(self):
            return next(self.feeds, None)

    fp32 = exported_graph(pipe, folder)
    out = folder / (fp32.stem + "-int8.onnx")
    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnxruntime_graph(out, torch.get_num_threads())


def _quality(files: list, inputs: list, results: list) -> dict:
    rows = []
    for p, inp, r in zip(files, inputs, results, strict=True):
        rows += score_pair(p.task, p.pair_id, inp.mri_y, inp.func_y, {"m": delivered_luma(r.pixels)})
    return summarize(rows)["m"]


def bench_tier(tier: str, sizes: list[int], runtimes: list[str], repeats: int, val: tuple, calib: list,
               folder: Path) -> list[dict]:
    """Rows for one tier: every runtime's speed and its difference from torch on validation pairs."""
    files, inputs = val
    rows = []
    reference = None
    for runtime in runtimes:
        pipe = open_pipeline(tier, "cpu")
        if runtime == "onnxruntime-int8":
            pipe.use_graph(runtime, _int8_graph(pipe, folder, calib))
        else:
            use_runtime(pipe, runtime, folder)
        out = pipe.fuse(inputs)
        row: dict = {"tier": pipe.model_name, "runtime": runtime}
        if reference is None:
            reference = out
        row["mad_vs_torch"] = round(255 * float(np.mean([np.abs(a.pixels - b.pixels).mean()
                                                         for a, b in zip(out, reference, strict=True)])), 3)
        if runtime.endswith("int8") and files:
            q, q_ref = _quality(files, inputs, out), _quality(files, inputs, reference)
            row["int8_metrics_within_3pct"] = {t: len(v) for t, v in held_metrics(q, q_ref).items()}
        for size in sizes:
            s = _time_per_pair(pipe, size, repeats)
            row[f"s_per_pair_{size}"] = round(s, 4)
            row[f"pairs_per_s_{size}"] = round(1 / s, 2)
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiers", default="fast,full")
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--runtimes", default="torch,onnxruntime,openvino")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--val-per-task", type=int, default=4, help="validation pairs per task for the differences")
    ap.add_argument("--quick", action="store_true", help="random tiny/fast models at 64 px (smoke run)")
    args = ap.parse_args()
    tiers = args.tiers.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    runtimes = args.runtimes.split(",")
    if args.quick:
        tiers, sizes, args.repeats, args.val_per_task = ["random:fast", "random:tiny"], [64], 1, 1
    val = _pairs("val", args.val_per_task)
    calib = _pairs("train", 4)[1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tier in tiers:
            is_fast = tier.endswith("fast")
            rts = runtimes + (["onnxruntime-int8"] if is_fast and "onnxruntime" in runtimes else [])
            rows += bench_tier(tier, sizes, rts, args.repeats, val, calib, Path(tmp))
    print(f"\n{'tier':<14} {'runtime':<17} " + " ".join(f"{'s/pair@' + str(s):>12} {'pairs/s':>8}" for s in sizes)
          + f" {'MAD vs torch':>13}")
    for r in rows:
        cells = " ".join(f"{r[f's_per_pair_{s}']:>12.3f} {r[f'pairs_per_s_{s}']:>8.2f}" for s in sizes)
        print(f"{r['tier']:<14} {r['runtime']:<17} {cells} {r['mad_vs_torch']:>13.3f}")
    print(json.dumps({"rows": rows, "sizes": sizes, "cpu": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "validation_pairs": len(val[1])}))


if __name__ == "__main__":
    main()
