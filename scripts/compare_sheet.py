"""Before/after contact sheet of weights files at full size: validation pairs as rows; MRI, functional, then each
weights file's fused image (256 px, every pixel as delivered), then a 2x crop of each fused image at the 96 px
window where the first and the last differ most (where to look).

    python scripts/compare_sheet.py weights/contact_sheet_v8_v9_fullsize.png OLD.pt weights/dmfnet_small.pt \
        [--tasks MRI-CT MRI-CT MRI-PET MRI-SPECT] [--picks 5 15 20 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.images.imaging import to_uint  # noqa: E402
from models.images.pair_input import decode_pair  # noqa: E402
from models.inference.weights import open_pipeline  # noqa: E402
from models.training.data import load_split  # noqa: E402

SIZE, WINDOW, LABEL = 256, 96, 16


def as_rgb8(pixels: np.ndarray) -> np.ndarray:
    """Delivered pixels (gray or RGB, float in [0, 1]) as 8-bit RGB."""
    rgb = pixels if pixels.ndim == 3 else np.stack([pixels] * 3, -1)
    return to_uint(rgb, 8).astype(np.uint8)


def most_different_window(x: np.ndarray, y: np.ndarray) -> tuple[int, int]:
    """Top-left corner of the WINDOW x WINDOW square with the largest summed |x - y| (stride 8)."""
    diff = np.abs(x.astype(np.float64) - y.astype(np.float64)).sum(-1)
    h, w = diff.shape
    best, corner = -1.0, (0, 0)
    for r in range(0, max(h - WINDOW, 0) + 1, 8):
        for c in range(0, max(w - WINDOW, 0) + 1, 8):
            s = diff[r : r + WINDOW, c : c + WINDOW].sum()
            if s > best:
                best, corner = s, (r, c)
    return corner


def main() -> int:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("weights", nargs="+", help="weights files (or full / fast), the first and the last are compared")
    ap.add_argument("--tasks", nargs="+", default=["MRI-CT", "MRI-CT", "MRI-PET", "MRI-SPECT"])
    ap.add_argument("--picks", nargs="+", type=int, default=[5, 15, 20, 10], help="index within the task's pairs")
    ap.add_argument("--root", default="../shared/data/harvard")
    ap.add_argument("--split-file", default="configs/harvard_split.json")
    args = ap.parse_args()
    val = load_split(args.root, args.split_file)["val"]
    picks = [[p for p in val if p.task == t][k] for t, k in zip(args.tasks, args.picks, strict=True)]
    inputs = [decode_pair(p.mri, p.functional, p.modality) for p in picks]
    fused = [[as_rgb8(r.pixels) for r in open_pipeline(w, "cpu").fuse(inputs)] for w in args.weights]
    names = ["MRI", "functional", *[Path(w).name for w in args.weights]]
    n_cols = 2 + 2 * len(args.weights)
    sheet = Image.new("RGB", (SIZE * n_cols, LABEL + SIZE * len(picks)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(names + [f"{n} 2x" for n in names[2:]]):
        draw.text((c * SIZE + 4, 2), name, fill="black")
    for r, (p, inp) in enumerate(zip(picks, inputs, strict=True)):
        row = [as_rgb8(inp.mri_y), np.asarray(Image.open(p.functional).convert("RGB")), *[f[r] for f in fused]]
        y0, x0 = most_different_window(fused[0][r], fused[-1][r])
        row += [f[r][y0 : y0 + WINDOW, x0 : x0 + WINDOW] for f in fused]
        for c, im in enumerate(row):
            sheet.paste(Image.fromarray(im).resize((SIZE, SIZE), Image.NEAREST), (c * SIZE, LABEL + r * SIZE))
        draw.text((4, LABEL + r * SIZE + 4), f"{p.task} {p.pair_id}", fill="yellow")
    sheet.save(args.out)
    print(f"{args.out}: {len(picks)} pairs x {len(args.weights)} weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
