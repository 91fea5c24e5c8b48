"""Run fusion methods over pairs, score them, and write CSV / Markdown / contact-sheet reports."""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from models.evaluation.baselines import BASELINES, fuse_baseline
from models.evaluation.colour import COLOUR_METRICS, colour_fidelity
from models.evaluation.metrics import METRICS, QUALITY_METRICS, score_pair
from models.images.colour import luminance
from models.images.imaging import DecodedImage, decode_image, to_uint
from models.images.pair_input import FusionResult, PairInput, decode_pair
from models.images.pairs import PairFiles, split_pairs, spread_per_task
from models.inference.pipeline import FusionPipeline

METHODS = ("model", *BASELINES)
REPORTED = (*METRICS, *COLOUR_METRICS)  # the luminance metrics, then whether the colour shows the tracer


def _reported(rows: list[dict]) -> list[str]:
    """The reported metrics every row carries (rows written by older code or tests may lack the colour ones)."""
    return [m for m in REPORTED if all(m in r for r in rows)]


def select_split(pairs: list[PairFiles], split: str, split_file: Path | None) -> list[PairFiles]:
    """Keep the 'train' or 'val' cases of a split file ('all' keeps everything)."""
    if split == "all":
        return pairs
    keep = split_pairs(pairs, split_file)[split]  # type: ignore[arg-type]
    if not keep:
        raise ValueError(f"no pairs left in split {split!r}")
    return keep


def load_prepared(p: PairFiles) -> PairInput:
    """Decode and prepare one pair of files (the evaluation's and the fitting scripts' input path)."""
    return decode_pair(p.mri, p.functional, p.modality, labels=("mri", p.modality))


def fused_path(fused_dir: Path, p: PairFiles) -> Path:
    """Where a folder of already-fused images keeps a pair's result (the layout ``dmfnet fuse --pairs`` writes)."""
    return fused_dir / p.task / f"{p.pair_id}.png"


def missing_fused(fused_dir: Path, pairs: list[PairFiles]) -> list[Path]:
    """The fused images a folder lacks for these pairs."""
    return [path for p in pairs if not (path := fused_path(fused_dir, p)).is_file()]


def _fused_from_dir(fused_dir: Path, p: PairFiles) -> FusionResult:
    path = fused_path(fused_dir, p)
    return FusionResult(decode_image(path, label=str(path)).pixels, p.modality)


def evaluate(
    pairs: list[PairFiles],
    methods: list[str],
    pipeline: FusionPipeline | None = None,
    fused_dirs: dict[str, Path] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    keep: set[tuple[str, str]] | None = None,
    workers: int | None = None,
) -> tuple[list[dict], dict[str, dict[tuple[str, str], np.ndarray]]]:
    """Fuse (or read) every pair with every method and score it; a method named in ``fused_dirs`` is read from
    that folder of already-fused images (another method's outputs, or ours from ``dmfnet fuse --pairs``).

    Inputs are decoded once for all methods; scoring runs in ``workers`` processes (default: one per
    core) while this process fuses the next chunk. The workers run ``metrics.score_pair`` and import
    only numpy/scipy (no torch: 0.5 s instead of 3.4 s start-up each). Returns per-image rows (ordered by pair, then
    method) and, per method, the fused images of the pairs in ``keep`` (for the contact sheet).
    """
    if "model" in methods and pipeline is None:
        raise ValueError("method 'model' needs a pipeline")
    workers = workers or os.cpu_count() or 1
    kept: dict[str, dict[tuple[str, str], np.ndarray]] = {m: {} for m in methods}
    futures = []
    bar = tqdm(total=len(pairs), desc=f"eval {','.join(methods)}", unit="pair", disable=not progress)
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) if workers > 1 else None
    try:
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            inputs = [load_prepared(p) for p in chunk]
            fused: dict[str, list[FusionResult]] = {}
            for m in methods:
                if fused_dirs and m in fused_dirs:
                    fused[m] = [_fused_from_dir(fused_dirs[m], p) for p in chunk]
                elif m == "model":
                    fused[m] = pipeline.fuse(inputs)  # type: ignore[union-attr]
                else:
                    fused[m] = fuse_baseline(m, inputs)
            for j, (p, inp) in enumerate(zip(chunk, inputs, strict=True)):
                ys = {m: delivered_luma(fused[m][j].pixels) for m in methods}
                args = (p.task, p.pair_id, inp.mri_y, inp.func_y, ys)
                colours = {m: colour_fidelity(inp.chroma, to_uint(fused[m][j].pixels, 8) / 255.0) for m in methods}
                futures.append((pool.submit(score_pair, *args) if pool else _Done(score_pair(*args)), colours))
                for m in methods:
                    if keep and (p.task, p.pair_id) in keep:
                        kept[m][(p.task, p.pair_id)] = fused[m][j].pixels
            bar.update(len(chunk))
        rows = [{**r, **colours[r["method"]]} for f, colours in futures for r in f.result()]
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        bar.close()
    return rows, kept


class _Done:
    """A finished result with the Future interface (no pool)."""

    def __init__(self, value: list[dict]) -> None:
        self.value = value

    def result(self) -> list[dict]:
        return self.value


def delivered_luma(pixels: np.ndarray) -> np.ndarray:
    """Luminance of the fused image as written to an 8-bit PNG (scores what users receive, rounding included)."""
    return luminance(DecodedImage(to_uint(pixels, 8).astype(np.float32) / 255.0, 8))


def summarize(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {task: {metric: mean, metric_std: std, n: count}}}."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["task"])].append(r)
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (method, task), rs in sorted(groups.items()):
        entry: dict[str, float] = {}
        for m in _reported(rs):
            vals = np.array([r[m] for r in rs], np.float64)
            entry[m] = float(vals.mean())
            entry[f"{m}_std"] = float(vals.std())
        entry["n"] = len(rs)
        out[method][task] = entry
    return dict(out)


def wins_against_baselines(summary: dict, method: str = "model") -> dict[str, list[str]]:
    """Per task: metrics on which ``method`` beats every baseline present (the quality bar)."""
    wins = {}
    for task, scores in summary.get(method, {}).items():
        others = [summary[b][task] for b in BASELINES if b in summary and task in summary[b]]
        wins[task] = [m for m in QUALITY_METRICS if all(scores[m] > o[m] for o in others)]
    return wins


def best_baseline(summary: dict, task: str) -> dict[str, float]:
    """Per quality metric, the best mean any baseline in ``summary`` reaches on ``task`` (the bar to beat)."""
    present = [summary[b][task] for b in BASELINES if b in summary and task in summary[b]]
    return {m: max(s[m] for s in present) for m in QUALITY_METRICS}


def markdown_table(summary: dict) -> str:
    """One table per task, methods as rows, mean ± std per metric."""
    lines = []
    tasks = sorted({t for per in summary.values() for t in per})
    for task in tasks:
        n = next(per[task]["n"] for per in summary.values() if task in per)
        shown = [m for m in REPORTED if all(m in per[task] for per in summary.values() if task in per)]
        lines += [f"**{task}** (n = {n})", "", "| method | " + " | ".join(shown) + " |",
                  "|---|" + "---|" * len(shown)]
        for method, per in summary.items():
            if task in per:
                s = per[task]
                cells = [f"{s[m]:.3f} ± {s[m + '_std']:.3f}" if m != "EN" else f"{s[m]:.3f}" for m in shown]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def contact_sheet(pairs: list[PairFiles], fused: dict[str, dict[tuple[str, str], np.ndarray]], path: Path) -> None:
    """PNG grid: one row per pair, columns MRI | functional | each method's fused image, labelled."""
    methods = list(fused)
    cell, pad, head = 192, 4, 18
    cols = 2 + len(methods)
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, len(pairs) * (cell + pad + head) + pad), "white")
    draw = ImageDraw.Draw(sheet)

    def put(img: np.ndarray, r: int, c: int, label: str) -> None:
        arr = to_uint(img, 8)
        im = Image.fromarray(arr).convert("RGB").resize((cell, cell), Image.Resampling.BILINEAR)
        x, y = pad + c * (cell + pad), pad + r * (cell + pad + head)
        draw.text((x, y), label, fill="black")
        sheet.paste(im, (x, y + head))

    for r, p in enumerate(pairs):
        put(decode_image(p.mri).pixels, r, 0, f"{p.task} {p.pair_id} MRI")
        put(decode_image(p.functional).pixels, r, 1, p.modality.upper())
        for c, m in enumerate(methods):
            if (p.task, p.pair_id) in fused[m]:
                put(fused[m][(p.task, p.pair_id)], r, 2 + c, m)
    sheet.save(path)


def sheet_pairs(pairs: list[PairFiles], per_task: int = 2) -> list[PairFiles]:
    """A few pairs per task, spread over the list away from its ends (deterministic)."""
    return spread_per_task(pairs, per_task, skip_ends=True)


def write_report(rows: list[dict], summary: dict, out_dir: Path, title: str, sheet: str | None,
                 plot: str | None = None) -> Path:
    """per_image.csv, summary.csv, summary.json, report.md (+ contact_sheet.png and the plot already written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "per_image.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["task", "id", "method", *_reported(rows)])
        w.writeheader()
        w.writerows(rows)
    reported = _reported(rows)
    with (out_dir / "summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "task", "n", *[x for m in reported for x in (m, m + "_std")]])
        for method, per in summary.items():
            for task, s in per.items():
                w.writerow([method, task, s["n"], *[f"{s[x]:.6g}" for m in reported for x in (m, m + "_std")]])
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    md = [f"# {title}", "", "Metrics on luminance, 0-255 scale (see models/evaluation/metrics.py); higher is "
          "better for all of them but Speckle (fused gradient that no mix of the sources' gradients explains: "
          "invented detail; lower is better). PSNR and Speckle are reported, not counted among the nine, as are "
          "HueShift% and ColourLost% (models/evaluation/colour.py: the share of the functional image's clearly "
          "coloured pixels whose hue moved over 12 degrees, or that came out grey; lower is better).", "",
          markdown_table(summary)]
    if "model" in summary and len(summary) > 1:
        md += ["Metrics where the model beats every baseline shown:", ""]
        md += [f"- {t}: {len(w)}/9 ({', '.join(w)})" for t, w in wins_against_baselines(summary).items()]
        md.append("")
    if plot:
        md += [f"![metrics per task]({plot})", ""]
    if sheet:
        md += [f"![contact sheet]({sheet})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path
