"""Does memory come back after large requests? RSS of a real server across N large pairs, heap trim on vs off.

Starts ``dmfnet serve`` twice (``DMFNET_MALLOC_TRIM=1`` then ``0``), sends ``--requests`` sequential
``--size`` x ``--size`` PET pairs, and reads the server's RSS after warm-up and after every request.

    python bench/memory.py [--weights random:tiny] [--size 2048] [--requests 20]

Last line: one JSON object (RSS after warm-up, after the last request, their ratio, per setting).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # harness/: shared with the tests, not installed
from harness.servers import rss_mb, start_server  # noqa: E402
from models.images.imaging import encode_png
from models.images.phantoms import phantom_pair


def run(weights: str, size: int, requests: int, trim: bool) -> dict:
    """One server, ``requests`` large pairs; RSS after warm-up and after each request."""
    m, f = phantom_pair("pet", size, size, seed=1)
    files = {"mri": ("m.png", encode_png(m)), "functional": ("f.png", encode_png(f))}
    proc, base = start_server(["--weights", weights, "--request-timeout-s", "3600"],
                              env={"DMFNET_MALLOC_TRIM": "1" if trim else "0", "DMFNET_MAX_UPLOAD_BYTES": str(2**28)})
    try:
        warm = rss_mb(proc.pid)
        after = []
        for _ in range(requests):
            r = httpx.post(f"{base}/fuse", files=files, timeout=3600)
            r.raise_for_status()
            after.append(round(rss_mb(proc.pid)))
    finally:
        proc.terminate()
        proc.wait(60)
    return {"trim": trim, "rss_after_warmup_mb": round(warm), "rss_after_each_mb": after,
            "ratio_last_vs_warmup": round(after[-1] / warm, 3), "ratio_max_vs_warmup": round(max(after) / warm, 3)}


def main() -> int:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="random:tiny")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--trim", choices=["both", "on", "off"], default="both")
    ap.add_argument("--off-requests", type=int, default=None, help="requests for the trim-off run (default: same)")
    args = ap.parse_args()
    settings = {"both": (True, False), "on": (True,), "off": (False,)}[args.trim]
    rows = [run(args.weights, args.size, args.requests if trim else (args.off_requests or args.requests), trim)
            for trim in settings]
    for r in rows:
        print(f"trim {'on ' if r['trim'] else 'off'}: RSS {r['rss_after_warmup_mb']} MB after warm-up -> "
              f"{r['rss_after_each_mb'][-1]} MB after {len(r['rss_after_each_mb'])} x {args.size}px "
              f"(x{r['ratio_last_vs_warmup']}, max x{r['ratio_max_vs_warmup']})")
    print(json.dumps({"weights": args.weights, "size": args.size, "requests": args.requests, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
