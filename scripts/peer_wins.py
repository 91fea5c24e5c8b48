"""Wins of a `dmfnet eval` run against the peers' published means (the quality round's visible target).

    python scripts/peer_wins.py reports/val/summary.json [--peers ../shared/notes/peer-scores-val.md] [--method model]

Reads the per-task tables of the peers file (rows: method | EN | SD | SF | AG | MI | SCD | VIF | Qabf | SSIM) and
prints, per task, on how many of the nine metrics the method beats each peer, both baselines at once, and every
peer at once; the target is >= 6 against every peer and >= 5 against both baselines, with SSIM within 0.01 of v4.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

METRICS = ["EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM"]
PEERS = ["LRFNet", "GeSeNet", "MATR", "MUFusion"]


def peer_tables(text: str) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {method: {metric: mean}}} from the markdown tables under each **TASK** heading."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    task = None
    for line in text.splitlines():
        heading = re.match(r"\*\*(MRI-[A-Z]+)\*\*", line.strip())
        if heading:
            task = heading.group(1)
            out[task] = {}
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if task and len(cells) == 10 and cells[0] not in ("method", "---"):
            try:
                out[task][cells[0]] = dict(zip(METRICS, map(float, cells[1:]), strict=True))
            except ValueError:
                continue
    return out


def wins(ours: dict[str, float], others: list[dict[str, float]]) -> list[str]:
    """Metrics where ``ours`` is above every one of ``others``."""
    return [m for m in METRICS if all(ours[m] > o[m] for o in others)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summary", help="summary.json of `dmfnet eval --split val`")
    ap.add_argument("--peers", default="../shared/notes/peer-scores-val.md")
    ap.add_argument("--method", default=None, help="method in the summary (default: model, else fused)")
    args = ap.parse_args()
    summary = json.loads(Path(args.summary).read_text())
    method = args.method or ("model" if "model" in summary else "fused")
    tables = peer_tables(Path(args.peers).read_text())
    for task, rows in tables.items():
        ours = summary[method][task]
        per_peer = {p: len(wins(ours, [rows[p]])) for p in PEERS if p in rows}
        baselines = wins(ours, [rows[b] for b in ("average", "max") if b in rows])
        every = wins(ours, [rows[p] for p in PEERS if p in rows])
        v4 = rows.get("shipped full (v4)", {}).get("SSIM")
        ssim = f"SSIM {ours['SSIM']:.3f}" + (f" (v4 {v4:.3f}, {ours['SSIM'] - v4:+.3f})" if v4 else "")
        print(f"{task}: per peer {per_peer}; every peer {len(every)}/9 {every}; both baselines {len(baselines)}/9; "
              f"{ssim}")


if __name__ == "__main__":
    main()
