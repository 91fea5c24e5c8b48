"""Copy trained weights into weights/ and record their sha256 in weights/weights.json (what the service verifies).

    python scripts/ship_weights.py runs/stage2_small/best_weights.pt [--name dmfnet_small.pt]
    python scripts/ship_weights.py runs/distill_fast/best_weights.pt --name dmfnet_fast.pt
    python scripts/ship_weights.py --graphs      # export the ONNX graph of every shipped weights file

Shipped graphs let ONNX Runtime start without an export (and without the export tools); the parity test
checks them against torch and against the weights' checksum.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from models.inference.manifest import sha256_file
from models.inference.weights import FAST_FORMAT, load_fast_weights, load_weights, weights_format

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def record(manifest: dict, path: Path, **extra) -> None:
    """Checksum and size of a shipped file into the manifest."""
    manifest["files"][path.name] = {"sha256": sha256_file(path), **extra, "bytes": path.stat().st_size}


def ship_graphs() -> None:
    """weights/<model>-<sha16>.onnx for each shipped weights file (stale graphs of earlier weights removed)."""
    from models.inference.export import export_onnx
    from models.inference.runtimes import graph_name
    from models.inference.weights import open_pipeline

    manifest_path = WEIGHTS / "weights.json"
    manifest = json.loads(manifest_path.read_text())
    for name in [n for n, e in manifest["files"].items() if "graph_of" in e]:
        (WEIGHTS / name).unlink(missing_ok=True)
        del manifest["files"][name]
    for name in [n for n in manifest["files"] if n.endswith(".pt")]:
        pipe = open_pipeline(str(WEIGHTS / name), "cpu", precision="fp32")
        target = export_onnx(pipe, WEIGHTS / graph_name(pipe))
        record(manifest, target, graph_of=name)
        print(json.dumps({target.name: manifest["files"][target.name]}))
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?")
    ap.add_argument("--name", default="dmfnet_small.pt")
    ap.add_argument("--graphs", action="store_true", help="export the ONNX graphs of the shipped weights")
    args = ap.parse_args()
    if args.graphs:
        ship_graphs()
        return
    if not args.source:
        ap.error("give a weights file to ship, or --graphs")
    # refuses anything that does not load
    fast = weights_format(args.source) == FAST_FORMAT
    cfg = load_fast_weights(args.source)[0] if fast else load_weights(args.source)[0]
    target = WEIGHTS / args.name
    WEIGHTS.mkdir(exist_ok=True)
    shutil.copyfile(args.source, target)
    manifest_path = WEIGHTS / "weights.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"files": {}}
    record(manifest, target, config=cfg.name)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest["files"][args.name]))


if __name__ == "__main__":
    main()
