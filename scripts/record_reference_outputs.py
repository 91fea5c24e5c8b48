"""Record the fused phantoms that tests/models/inference/test_outputs_unchanged.py compares against (run only
when a change is *meant* to change outputs, and say so in the commit): tiny random model and both shipped tiers,
8-bit."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # harness/: shared with the tests, not installed
from harness.reference_outputs import CASES, THREADS, cpu_signature, fused_cases, reference_pipelines  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tests" / "data"


def main() -> int:  # noqa: D103
    argparse.ArgumentParser(description=__doc__).parse_args()  # --help must not overwrite the recording
    torch.set_num_threads(THREADS)
    arrays = fused_cases(reference_pipelines())
    np.savez_compressed(OUT / "reference_outputs.npz", **arrays)
    meta = {"cpu": cpu_signature(), "threads": THREADS, "cases": CASES,
            "sha256": {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in arrays.items()}}
    (OUT / "reference_outputs.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"recorded {len(arrays)} outputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
