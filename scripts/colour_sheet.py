"""Contact sheet of the colour merge, before and after (issue #46): for the validation pairs whose hue moved most
under the old channel-by-channel clipping, the 96 px window with the most shifted pixels (skull edges and bright
white matter over tracer) at 3x, nearest neighbour (every pixel as it is):
MRI | functional | clipped (before) | gamut-aware (after), each labelled with the image's HueShift% / ColourLost%.

    python scripts/colour_sheet.py [--weights full] [--ids MRI-PET/30086,...] [--out weights/colour_sheet_val.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from models.evaluation.colour import clipped_merge, colour_faults, colour_fidelity
from models.evaluation.report import load_prepared
from models.images.colour import merge_luma
from models.images.imaging import decode_image, to_uint
from models.images.pairs import discover_pairs
from models.inference.weights import open_pipeline

DEFAULT_IDS = "MRI-PET/30086,MRI-PET/30084,MRI-SPECT/36042,MRI-SPECT/36041"  # most shifted under v5 (val split)
WINDOW, ZOOM = 96, 3


def worst_window(mask: np.ndarray) -> tuple[int, int]:
    """Top-left corner of the WINDOW x WINDOW crop holding the most marked pixels (summed-area table)."""
    s = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    counts = s[WINDOW:, WINDOW:] - s[:-WINDOW, WINDOW:] - s[WINDOW:, :-WINDOW] + s[:-WINDOW, :-WINDOW]
    i, j = np.unravel_index(int(np.argmax(counts)), counts.shape)
    return int(i), int(j)


def main() -> int:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="../shared/data/harvard")
    ap.add_argument("--weights", default="full")
    ap.add_argument("--ids", default=DEFAULT_IDS)
    ap.add_argument("--out", default="weights/colour_sheet_val.png")
    args = ap.parse_args()
    wanted = [tuple(x.split("/")) for x in args.ids.split(",")]
    found = {(p.task, p.pair_id): p for p in discover_pairs(args.pairs)}
    missing = [w for w in wanted if w not in found]
    if missing:
        print(f"error: no such pairs under {args.pairs}: {missing}", file=sys.stderr)
        return 2
    pipe = open_pipeline(args.weights, "cpu")
    cell, head, pad = WINDOW * ZOOM, 30, 6
    sheet = Image.new("RGB", (4 * (cell + pad) + pad, len(wanted) * (cell + head + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, key in enumerate(wanted):
        p = found[key]
        inp = load_prepared(p)
        y = pipe.fuse_lumas([inp])[0]
        before, after = clipped_merge(y, inp.chroma), merge_luma(y, inp.chroma)
        i, j = worst_window(colour_faults(inp.chroma, to_uint(before, 8) / 255.0)[1])
        crop = (slice(i, i + WINDOW), slice(j, j + WINDOW))
        cells = [("MRI", decode_image(p.mri).pixels), (p.modality.upper(), decode_image(p.functional).pixels),
                 ("before: clipped", before), ("after: gamut-aware", after)]
        for c, (label, img) in enumerate(cells):
            if c >= 2:
                s = colour_fidelity(inp.chroma, to_uint(img, 8) / 255.0)
                label += f"  hue {s['HueShift%']:.2f}% lost {s['ColourLost%']:.2f}%"
            x, yy = pad + c * (cell + pad), pad + r * (cell + head + pad)
            draw.text((x, yy), f"{p.task} {p.pair_id}" if c == 0 else "", fill="black")
            draw.text((x, yy + 14), label + (f"  rows {i}-{i + WINDOW}, cols {j}-{j + WINDOW}" if c == 0 else ""),
                      fill="black")
            tile = Image.fromarray(to_uint(img[crop], 8)).convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (x, yy + head))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
