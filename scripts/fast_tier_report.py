"""Fast tier vs the full model on the whole validation split: the nine metrics side by side (and the four
baselines), how many stay within 3% per task, the pixel difference, and a teacher-vs-student contact sheet.

    python scripts/fast_tier_report.py [--fast weights/dmfnet_fast.pt] [--teacher-cache runs/distill_fast/teacher_<sha>]
        [--out weights/training/fast_tier_eval.json] [--sheet weights/contact_sheet_fast.png]

The full model's outputs come from the distillation's teacher cache when given (they are the same
deterministic outputs), otherwise they are computed (about 3 s per pair on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from models.evaluation.baselines import BASELINES, fuse_baseline
from models.evaluation.metrics import QUALITY_METRICS, score_pair
from models.evaluation.report import delivered_luma, load_prepared, summarize
from models.images.colour import merge_luma
from models.images.imaging import decode_image, to_uint
from models.images.pairs import spread_per_task
from models.inference.weights import FAST_WEIGHTS, open_pipeline
from models.training.data import load_split
from models.training.distill import held_metrics

ROOT = Path(__file__).resolve().parent.parent


def _teacher_lumas(pairs, inputs, cache: Path | None) -> list[np.ndarray]:
    if cache is not None:
        return [np.load(cache / p.task / f"{p.pair_id}.npy") for p in pairs]
    return open_pipeline("full", "cpu").fuse_lumas(inputs)


def _sheet(rows: list[tuple[str, list[np.ndarray]]], path: Path) -> None:
    """One row per pair: MRI | functional | full model | fast tier | 4 x |difference|."""
    labels = ["MRI", "functional", "DM-FNet (full)", "dmfnet-fast", "|full - fast| x4"]
    cell, pad, head = 192, 4, 16
    sheet = Image.new("RGB", (len(labels) * (cell + pad) + pad, len(rows) * (cell + pad + head) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (title, images) in enumerate(rows):
        for c, img in enumerate(images):
            x, y = pad + c * (cell + pad), pad + r * (cell + pad + head)
            draw.text((x, y), f"{title} {labels[c]}" if c == 0 else labels[c], fill="black")
            im = Image.fromarray(to_uint(np.clip(img, 0, 1), 8)).convert("RGB")
            sheet.paste(im.resize((cell, cell), Image.Resampling.BILINEAR), (x, y + head))
    sheet.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", default=str(FAST_WEIGHTS))
    ap.add_argument("--teacher-cache", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "harvard")
    ap.add_argument("--out", type=Path, default=ROOT / "weights" / "training" / "fast_tier_eval.json")
    ap.add_argument("--sheet", type=Path, default=ROOT / "weights" / "contact_sheet_fast.png")
    args = ap.parse_args()
    pairs = load_split(args.data, ROOT / "configs" / "harvard_split.json")["val"]
    inputs = [load_prepared(p) for p in pairs]
    fast = open_pipeline(args.fast, "cpu")
    student = fast.fuse_lumas(inputs)
    teacher = _teacher_lumas(pairs, inputs, args.teacher_cache)
    rows, mad = [], {}
    for p, inp, s, t in zip(pairs, inputs, student, teacher, strict=True):
        ys = {"full": delivered_luma(merge_luma(t, inp.chroma)), "fast": delivered_luma(merge_luma(s, inp.chroma))}
        rows += score_pair(p.task, p.pair_id, inp.mri_y, inp.func_y, ys)
        mad.setdefault(p.task, []).append(255 * float(np.abs(ys["full"] - ys["fast"]).mean()))
    for m in BASELINES:
        for p, inp, r in zip(pairs, inputs, fuse_baseline(m, inputs), strict=True):
            rows += score_pair(p.task, p.pair_id, inp.mri_y, inp.func_y, {m: delivered_luma(r.pixels)})
    summary = summarize(rows)
    strict = held_metrics(summary["fast"], summary["full"], 0.03)
    no_worse = {t: [m for m in QUALITY_METRICS if s[m] >= 0.97 * summary["full"][t][m]]
                for t, s in summary["fast"].items()}
    for task in summary["full"]:
        print(f"\n{task} ({summary['full'][task]['n']} pairs): within 3% {len(strict[task])}/9, "
              f"no more than 3% worse {len(no_worse[task])}/9, mean |full - fast| {np.mean(mad[task]):.2f}/255")
        print(f"{'method':<10} " + " ".join(f"{m:>7}" for m in QUALITY_METRICS))
        for method in ("full", "fast", *BASELINES):
            print(f"{method:<10} " + " ".join(f"{summary[method][task][m]:>7.3f}" for m in QUALITY_METRICS))
    doc = {"summary": summary, "within_3pct": strict, "no_more_than_3pct_worse": no_worse,
           "mad_255": {t: round(float(np.mean(v)), 3) for t, v in mad.items()}, "fast_weights": fast.weights_sha256}
    args.out.write_text(json.dumps(doc, indent=1))
    chosen = {(p.task, p.pair_id) for p in spread_per_task(pairs, 2, skip_ends=True)}
    sheet_rows = []
    for p, inp, s, t in zip(pairs, inputs, student, teacher, strict=True):
        if (p.task, p.pair_id) in chosen:
            full, quick = merge_luma(t, inp.chroma), merge_luma(s, inp.chroma)
            diff = np.clip(4 * np.abs(t - s), 0, 1)
            sheet_rows.append((f"{p.task} {p.pair_id}", [decode_image(p.mri).pixels, decode_image(p.functional).pixels,
                                                          full, quick, diff]))
    _sheet(sheet_rows, args.sheet)
    print(f"\nwrote {args.out} and {args.sheet}")


if __name__ == "__main__":
    main()
