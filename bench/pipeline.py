"""Pipeline throughput: the reference's schedule vs this project's batched pipeline, side by side in one run.

``--weights fast`` (or any ``dmfnet-fast`` file) measures the distilled fast tier, and the full DM-FNet in
the same run (reference schedule and batched at batch 1), so the ratio between tiers is like for like.

Reference schedule (as in HeDan-11/DM-FNet's test script): fp32, one UNet pass per (modality, timestep)
per pair, batch 1. Ours: all 2 x T passes of every pair of a batch go through the UNet in chunks, under
the precision chosen for the device ("auto": bf16 only on CUDA / AMX / AVX512-BF16).

    python bench/pipeline.py [--weights full|fast|FILE] [--size 256] [--batches 1,4,8] [--quick]
        [--precisions fp32,bf16] [--variants eager,channels_last,compile,cudagraphs]

``--precisions`` / ``--variants`` add a grid (each precision x variant x batch): channels_last memory format,
``torch.compile`` of the UNet, and CUDA graphs (``torch.compile(mode="reduce-overhead")``, CUDA only).

Prints a table and, as the last line, one JSON object (config, device, numbers and ratios).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

from models.images.phantoms import phantom_inputs
from models.inference.hardware import cpu_has_fast_bf16
from models.inference.pipeline import Fuser, FusionPipeline
from models.inference.weights import open_pipeline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_schedule(pipe: FusionPipeline, pairs: list) -> None:
    """One pass per (pair, modality, timestep), fp32, batch 1 - the reference's loop."""
    for p in pairs:
        a = torch.from_numpy(p.mri_y)[None, None]
        b = torch.from_numpy(p.func_y)[None, None]
        with torch.inference_mode():
            fa: dict[int, list] = {s: [] for s in pipe.cfg.fusion.scales}
            fb: dict[int, list] = {s: [] for s in pipe.cfg.fusion.scales}
            for t in pipe.cfg.fusion.timesteps:
                for x, store, mi in ((a, fa, 0), (b, fb, 1)):
                    x = x.to(pipe.device) * 2 - 1
                    lvl = pipe.diffusion.level(t)
                    noisy = pipe.diffusion.q_sample(x, lvl, pipe.noise_for(mi, t, *x.shape[-2:]).to(pipe.device))
                    _, f = pipe.unet(noisy, torch.full((1,), lvl, device=pipe.device),
                                     feature_scales=pipe.cfg.fusion.scales, return_output=False)
                    for s in store:
                        store[s].append(f[s])
            pipe.head({s: torch.cat(v, 1) for s, v in fa.items()}, {s: torch.cat(v, 1) for s, v in fb.items()},
                      a.to(pipe.device) * 2 - 1, b.to(pipe.device) * 2 - 1)


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def gflops_per_pair(pipe: Fuser, size: int) -> float:
    """Counted (not estimated) GFLOPs of one pair: every network pass (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        pipe.fuse(phantom_inputs(1, size))
    return counter.get_total_flops() / 1e9


def precision_mad(weights: str | None, device, size: int = 64) -> float | None:
    """Mean |bf16 - fp32| of the fused output (0-1 scale) on a small pair; bf16 is slow where it is emulated."""
    pair = phantom_inputs(1, size)
    bf = open_pipeline(weights, device, precision="bf16").fuse(pair)[0].pixels
    fp = open_pipeline(weights, device, precision="fp32", channels_last=False).fuse(pair)[0].pixels
    return float(abs(bf - fp).mean())


VARIANTS = ("eager", "channels_last", "compile", "cudagraphs")


def variant_grid(weights: str | None, device, size: int, batches: list[int], precisions: list[str],
                 variants: list[str], repeats: int) -> dict[str, dict[str, float]]:
    """pairs/s for every precision x variant x batch ("fp32/compile" -> {"8": 12.3, ...})."""
    out: dict[str, dict[str, float]] = {}
    for precision in precisions:
        for variant in variants:
            if variant not in VARIANTS:
                raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
            pipe = open_pipeline(weights, device, precision=precision, channels_last=variant != "eager")
            if variant == "cudagraphs" and pipe.device.type != "cuda":
                continue  # CUDA graphs exist on CUDA only
            if variant in ("compile", "cudagraphs"):
                mode = "reduce-overhead" if variant == "cudagraphs" else "default"
                name = "unet" if isinstance(pipe, FusionPipeline) else "net"  # the network that does the work
                setattr(pipe, name, torch.compile(getattr(pipe, name), mode=mode, dynamic=False))
            row = {}
            for b in batches:
                pairs = phantom_inputs(b, size)
                row[str(b)] = round(b / _time(lambda pairs=pairs, pipe=pipe: pipe.fuse(pairs), repeats, pipe.device), 3)
            out[f"{precision}/{variant}"] = row
            print(f"{precision + '/' + variant:<24} " + " ".join(f"b{b}: {v:.2f}/s" for b, v in row.items()),
                  flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None,
                    help="full (default: shipped DM-FNet), fast (shipped fast tier), a weights file or random:CONFIG")
    ap.add_argument("--device", default=None)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="64 px, batches 1,2, one repeat (smoke run)")
    ap.add_argument("--precisions", default=None, help="comma list (fp32,bf16): measure the variant grid")
    ap.add_argument("--variants", default="eager", help=f"comma list of {', '.join(VARIANTS)}")
    args = ap.parse_args()
    if args.quick:
        args.size, args.batches, args.repeats = 64, "1,2", 1
    batches = [int(b) for b in args.batches.split(",")]

    ours = open_pipeline(args.weights, args.device, precision="auto")
    full_weights = args.weights if isinstance(ours, FusionPipeline) else None  # a fast tier: shipped DM-FNet
    ref = open_pipeline(full_weights, args.device, precision="fp32", channels_last=False, chunk_size=1)
    dev = ours.device
    n_ref = max(1, min(batches))
    ref_s = _time(lambda: reference_schedule(ref, phantom_inputs(n_ref, args.size)), args.repeats, dev) / n_ref
    rows = [(f"{ref.model_name} reference fp32, 1 pass at a time", 1, ref_s)]
    full_s = None
    if ours is not ref and not isinstance(ours, FusionPipeline):
        full = open_pipeline(full_weights, args.device, precision="auto")
        full_s = _time(lambda: full.fuse(phantom_inputs(1, args.size)), args.repeats, dev)
        rows.append((f"{full.model_name} batched {full.precision}", 1, full_s))
    ours_s = {}
    for b in batches:
        pairs = phantom_inputs(b, args.size)
        ours_s[b] = _time(lambda pairs=pairs: ours.fuse(pairs), args.repeats, dev) / b
        rows.append((f"{ours.model_name} batched {ours.precision}{' channels_last' if ours.channels_last else ''}",
                     b, ours_s[b]))
    # Numerical agreement of bf16 with fp32 (same noise, same weights), and the work per pair.
    mad = precision_mad(args.weights, args.device)
    gflops = gflops_per_pair(ours, args.size)
    params = sum(p.numel() for m in _networks(ours) for p in m.parameters())
    best_b = min(ours_s, key=ours_s.get)

    print(f"{'schedule':<48} {'batch':>5} {'s/pair':>8} {'pairs/s':>8} {'speed-up':>8}")
    for name, b, s in rows:
        print(f"{name:<48} {b:>5} {s:>8.3f} {1 / s:>8.2f} {ref_s / s:>7.2f}x")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{ours.model_name}: {params / 1e6:.2f} M params; {gflops:.2f} GFLOP per pair; "
          f"peak RSS {peak_mb:.0f} MB; mean |bf16 - fp32| = {mad:.2e} (0-1 scale, 64 px pair)")
    if full_s is not None:
        print(f"{ours.model_name} vs {ref.model_name} (batched, best batch): {full_s / ours_s[best_b]:.1f}x faster")
    if ours.precision == "fp32" and dev.type == "cpu":
        print("note: this CPU has no AMX/AVX512-BF16, so 'auto' chose fp32 (bf16 would be emulated, far slower)")
    grid = (variant_grid(args.weights, args.device, args.size, batches, args.precisions.split(","),
                         args.variants.split(","), args.repeats) if args.precisions else {})
    print(json.dumps({
        "variants": grid, "model": ours.model_name,
        "config": ours.cfg.name, "weights": ours.weights_sha256 or ours.weights_path, "size": args.size,
        "device": str(dev), "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "fast_bf16_cpu": cpu_has_fast_bf16(), "precision": ours.precision, "channels_last": ours.channels_last,
        "chunk_size": ours.chunk_size, "reference_pairs_per_s": round(1 / ref_s, 3),
        "full_batched_pairs_per_s": round(1 / full_s, 3) if full_s else None,
        "batched_pairs_per_s": {str(b): round(1 / s, 3) for b, s in ours_s.items()},
        "best_batch": best_b, "speedup": round(ref_s / ours_s[best_b], 2), "bf16_vs_fp32_mad": mad,
        "gflop_per_pair": round(gflops, 3), "params": params, "peak_rss_mb": round(peak_mb),
    }))


def _networks(pipe: Fuser) -> list[torch.nn.Module]:
    """The networks a pipeline runs (UNet and head for DM-FNet, the one network of the fast tier)."""
    return [pipe.unet, pipe.head] if isinstance(pipe, FusionPipeline) else [pipe.net]


if __name__ == "__main__":
    main()
