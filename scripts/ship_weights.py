"""Copy trained weights into weights/ and record their sha256 in weights/weights.json (what the service verifies).

    python scripts/ship_weights.py runs/stage2_small/best_weights.pt [--name dmfnet_small.pt]
    python scripts/ship_weights.py runs/distill_fast/best_weights.pt --name dmfnet_fast.pt
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from models.weights import FAST_FORMAT, load_fast_weights, load_weights, sha256_file, weights_format

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("--name", default="dmfnet_small.pt")
    args = ap.parse_args()
    # refuses anything that does not load
    fast = weights_format(args.source) == FAST_FORMAT
    cfg = load_fast_weights(args.source)[0] if fast else load_weights(args.source)[0]
    target = WEIGHTS / args.name
    WEIGHTS.mkdir(exist_ok=True)
    shutil.copyfile(args.source, target)
    manifest_path = WEIGHTS / "weights.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"files": {}}
    manifest["files"][args.name] = {"sha256": sha256_file(target), "config": cfg.name,
                                    "bytes": target.stat().st_size}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest["files"][args.name]))


if __name__ == "__main__":
    main()
