"""Fusion cost by image size: seconds, seconds per megapixel and peak memory, tiled vs untiled.

Each measurement runs in its own process so that its peak RSS is its own. Gray CT and colour PET phantom
pairs at each size go through ``Fuser.fuse`` (tiled above one tile); for sizes that also fit
untiled (``--untiled-up-to``) the untiled output is computed too and the mean absolute difference between
the two is reported (in 8-bit grey levels). ``--attention`` also compares the UNet's fused attention
(``scaled_dot_product_attention``) with an explicit softmax(QK^T)V at one tile.

    python bench/sizes.py [--weights W] [--sizes 256,512,1024,2048,4096] [--quick]

Prints a table and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _worker(job: dict) -> dict:
    """Runs in a child process: one fusion, reports time, peak RSS and (optionally) the untiled output."""
    import numpy as np
    import torch

    from models.images.phantoms import phantom_inputs
    from models.inference.weights import open_pipeline

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    if job.get("explicit_attention"):
        _use_explicit_attention()
    kw = {"tile_size": job["tile"], "tile_overlap": job["overlap"]}
    pipe = open_pipeline(job["weights"], "cpu", **kw)
    pair = phantom_inputs(1, job["size"], job["modality"])
    base_rss = _rss_mb()
    t0 = time.perf_counter()
    out = pipe.fuse(pair)[0].pixels
    seconds = time.perf_counter() - t0
    doc = {"seconds": seconds, "peak_rss_mb": _rss_mb(), "rss_after_load_mb": base_rss,
           "shape": list(out.shape)}
    if job.get("save"):
        np.save(job["save"], out)
    return doc


def _use_explicit_attention() -> None:
    """Swap the UNet's fused attention for the textbook softmax(QK^T / sqrt(d)) V (for comparison only)."""
    import torch

    from models.nets import unet

    def explicit(q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return w @ v

    unet.F = type("F", (), {**{n: getattr(unet.torch.nn.functional, n) for n in dir(unet.torch.nn.functional)
                                if not n.startswith("_")}, "scaled_dot_product_attention": staticmethod(explicit)})


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(job: dict, timeout_s: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="weights file or random:CONFIG (default: shipped)")
    ap.add_argument("--sizes", default="256,512,1024,2048,4096")
    ap.add_argument("--modalities", default="ct,pet")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--untiled-up-to", type=int, default=512, help="also fuse untiled up to this size")
    ap.add_argument("--attention", action="store_true", help="compare fused vs explicit attention at one tile")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--timeout-s", type=float, default=3600)
    ap.add_argument("--quick", action="store_true", help="tiny random model, sizes 64..512 (CI)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.weights, args.sizes, args.tile, args.overlap, args.untiled_up_to = "random:tiny", "64,128,256", 64, 16, 128
    import numpy as np

    sizes = [int(s) for s in args.sizes.split(",")]
    base = {"weights": args.weights, "tile": args.tile, "overlap": args.overlap, "threads": args.threads}
    rows = []
    tmp = ROOT / "reports" / "sizes"
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"{'modality':>8} {'size':>5} {'s':>8} {'s/MP':>7} {'peak RSS MB':>11} {'untiled s':>9} "
          f"{'untiled RSS':>11} {'MAD (8-bit)':>11}", flush=True)
    for modality in args.modalities.split(","):
        for size in sizes:
            tiled_npy, untiled_npy = tmp / f"{modality}{size}_t.npy", tmp / f"{modality}{size}_u.npy"
            r = _run({**base, "modality": modality, "size": size, "save": str(tiled_npy)}, args.timeout_s)
            row = {"modality": modality, "size": size, **r}
            if "seconds" in r:
                row["s_per_mp"] = r["seconds"] / (size * size / 1e6)
            if size <= args.untiled_up_to and size > args.tile and "seconds" in r:
                u = _run({**base, "tile": size, "modality": modality, "size": size, "save": str(untiled_npy)},
                         args.timeout_s)
                row["untiled"] = u
                if "seconds" in u:
                    row["mad_8bit"] = float(np.abs(np.load(tiled_npy) - np.load(untiled_npy)).mean() * 255)
            rows.append(row)
            u = row.get("untiled", {})
            print(f"{modality:>8} {size:>5} {row.get('seconds', float('nan')):8.1f} "
                  f"{row.get('s_per_mp', float('nan')):7.1f} {row.get('peak_rss_mb', float('nan')):11.0f} "
                  f"{u.get('seconds', float('nan')):9.1f} {u.get('peak_rss_mb', float('nan')):11.0f} "
                  f"{row.get('mad_8bit', float('nan')):11.3f}" + (f"  {row['error']}" if "error" in row else ""),
                  flush=True)
            for f in (tiled_npy, untiled_npy):
                f.unlink(missing_ok=True)
    doc: dict = {"weights": args.weights or "shipped", "tile": args.tile, "overlap": args.overlap, "rows": rows}
    by = {(r["modality"], r["size"]): r for r in rows}
    for modality in args.modalities.split(","):
        lo, hi = by.get((modality, sorted(sizes)[1] if len(sizes) > 1 else sizes[0])), by.get((modality, max(sizes)))
        if lo and hi and "s_per_mp" in lo and "s_per_mp" in hi:
            doc[f"{modality}_s_per_mp_ratio_largest_vs_second"] = hi["s_per_mp"] / lo["s_per_mp"]
    if args.attention:
        att = {}
        for name, explicit in (("sdpa", False), ("explicit", True)):
            att[name] = _run({**base, "modality": "pet", "size": args.tile, "explicit_attention": explicit},
                             args.timeout_s)
        print(f"attention at one {args.tile}px tile: " + ", ".join(
            f"{k} {v.get('seconds', float('nan')):.2f} s, peak RSS {v.get('peak_rss_mb', float('nan')):.0f} MB"
            for k, v in att.items()), flush=True)
        doc["attention"] = att
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
