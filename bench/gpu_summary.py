"""Summarise a ``bench/gpu_check.sh`` run: one JSON line from the step table, device facts and each bench's
last JSON line (``python bench/gpu_summary.py OUT_DIR``)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def last_json(path: Path) -> dict | None:
    """The last line of a log that parses as a JSON object, or None."""
    if not path.exists():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def main(out: Path) -> int:  # noqa: D103
    device = last_json(out / "device.json") or {}
    steps = {}
    for line in (out / "steps.tsv").read_text().splitlines():
        name, rc, seconds = line.split("\t")
        steps[name] = {"rc": int(rc), "seconds": int(seconds), "timed_out": rc == "124"}
    tests = (out / "cuda_tests.log").read_text(errors="replace") if (out / "cuda_tests.log").exists() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tests)}
    doc = {"cuda": bool(device.get("cuda")), "device": device, "steps": steps, "cuda_tests": counts}
    for name in ("pipeline_small", "pipeline_paper", "load", "study"):
        doc[name] = last_json(out / f"{name}.log")
    doc["ok"] = all(s["rc"] == 0 for s in steps.values()) and not counts.get("failed") and not counts.get("error")
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "reports/gpu_check")))
