"""Large real images end to end: a real slice upsampled, fused by ``dmfnet fuse``, checked for tile seams.

1. Upsample a real MRI + PET/SPECT/CT pair (default 8x: 256 -> 2048 px, bicubic) and write both as PNG.
2. Fuse them with the CLI exactly as a user would (``dmfnet fuse``), recording its wall time and peak RSS.
3. Seam check: for every tile-border column, the mean absolute step between neighbouring pixels across it,
   divided by the same on the columns 8 and 16 px either side (same phase of the 8x upsampling grid, same
   local anatomy); the median over borders is ~1 without a seam and grows with one. Plus a contact sheet of
   a crop where four tiles meet.

    python bench/tile_seams.py [--pair ../shared/data/harvard/MRI-PET/25042] [--scale 8] [--weights W]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _find_pair(stem: Path) -> tuple[Path, Path, str]:
    mri = stem.parent / f"{stem.name}_mri.png"
    for modality in ("pet", "spect", "ct"):
        other = stem.parent / f"{stem.name}_{modality}.png"
        if other.exists():
            return mri, other, modality
    raise SystemExit(f"no {stem.name}_{{pet,spect,ct}}.png beside {mri}")


def _border_lines(length: int, tile: int, overlap: int) -> list[int]:
    """Where one tile's blend ramp ends and the next one's begins (the seams, if any)."""
    from models.inference.tiling import tile_starts

    starts = tile_starts(length, tile, overlap)
    return sorted({s for s in starts[1:]} | {s + tile for s in starts[:-1]})


def main() -> int:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", default=str(ROOT.parent / "shared/data/harvard/MRI-PET/25042"),
                    help="path stem of a pair: STEM_mri.png + STEM_pet|spect|ct.png")
    ap.add_argument("--scale", type=int, default=8)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--out", default="reports/tile_seams", help="working folder")
    ap.add_argument("--sheet", default="docs/tile_seams.png", help="contact sheet path")
    ap.add_argument("--reuse", action="store_true", help="analyse the fused image already in --out")
    args = ap.parse_args()

    from models.images.imaging import decode_image, encode_png, resize_to

    mri_path, other_path, modality = _find_pair(Path(args.pair))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mri, other = decode_image(mri_path), decode_image(other_path)
    size = (mri.size[0] * args.scale, mri.size[1] * args.scale)
    big_mri, big_other = resize_to(mri, size), resize_to(other, size)
    (out / "mri.png").write_bytes(encode_png(big_mri.pixels))
    (out / f"{modality}.png").write_bytes(encode_png(big_other.pixels))

    cmd = [sys.executable, "-m", "dmfnet", "fuse", str(out / "mri.png"), str(out / f"{modality}.png"),
           "-o", str(out / "fused.png"), "--modality", modality, "--tile-size", str(args.tile),
           "--tile-overlap", str(args.overlap)]
    if args.weights:
        cmd += ["--weights", args.weights]
    t0 = time.perf_counter()
    if not (args.reuse and (out / "fused.png").exists()):
        subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    fused = decode_image(out / "fused.png").pixels
    y = fused if fused.ndim == 2 else fused @ np.array([0.299, 0.587, 0.114], np.float32)
    h, w = y.shape
    step_x = np.abs(np.diff(y, axis=1)) * 255  # step between column c and c+1
    rows = _border_lines(h, args.tile, args.overlap)
    cols = _border_lines(w, args.tile, args.overlap)
    ratios = []
    for c in cols:
        i = c - 1  # step index i = between columns i and i + 1
        near = [step_x[:, i + d].mean() for d in (-16, -8, 8, 16) if 0 <= i + d < w - 1]
        if 0 <= i < w - 1 and near and np.mean(near) > 0.5:  # skip flat background (ratios of ~0 / ~0)
            ratios.append(float(step_x[:, i].mean() / np.mean(near)))
    seam = float(np.median(ratios)) if ratios else float("nan")
    _sheet(big_mri.pixels, big_other.pixels, fused, rows, cols, Path(args.sheet), args.tile, modality, args.scale)
    doc = {"input": f"{mri_path.parent.name}/{mri_path.stem.replace('_mri', '')}", "modality": modality,
           "size": [h, w], "seconds": None if args.reuse else round(seconds, 1),
           "peak_rss_mb": None if args.reuse else round(peak_mb),
           "borders_checked": len(ratios), "seam_ratio_median": round(seam, 3),
           "seam_ratio_max": round(max(ratios), 3) if ratios else None, "sheet": args.sheet}
    print(json.dumps(doc))
    return 0


def _sheet(mri: np.ndarray, other: np.ndarray, fused: np.ndarray, rows: list[int], cols: list[int], path: Path,
           tile: int, modality: str, scale: int) -> None:
    """Crop where four tiles meet: MRI, functional, fused, fused with the tile borders drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cy = min(rows, key=lambda r: abs(r - mri.shape[0] // 2))
    cx = min(cols, key=lambda c: abs(c - mri.shape[1] // 2))
    half = tile // 2
    sl = (slice(max(0, cy - half), cy + half), slice(max(0, cx - half), cx + half))
    panels = [(mri[sl], "MRI (8x upsampled)"), (other[sl], modality.upper()), (fused[sl], "fused (tiled)"),
              (fused[sl], "fused, tile borders marked")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    for ax, (img, title) in zip(axes, panels, strict=True):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    for r in rows:
        if sl[0].start <= r < sl[0].stop:
            axes[3].axhline(r - sl[0].start, color="cyan", lw=0.6, ls="--")
    for c in cols:
        if sl[1].start <= c < sl[1].stop:
            axes[3].axvline(c - sl[1].start, color="cyan", lw=0.6, ls="--")
    fig.suptitle(f"{tile} px tiles across a real slice upsampled {scale}x: crop where four tiles meet "
                 "(dashed: where the blend ramps start and end)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
