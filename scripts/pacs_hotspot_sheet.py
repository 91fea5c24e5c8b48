"""Contact sheet: a PET hot spot at 2.7x cortex uptake, windowed the old way (0 to the 99.5th percentile) and
the current way (the series' full quantitative range), each fused with the shipped weights.

    python scripts/pacs_hotspot_sheet.py [--out docs/pacs_hotspot.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from app.pacs.workflow import InProcessFuser
from models.images.colour import hot_colormap
from models.inference.weights import open_pipeline
from models.volumes import dicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # harness/: shared with the tests, not installed
from harness.studies import hot_lesion_pet, make_study  # noqa: E402


def main() -> int:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/pacs_hotspot.png")
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = make_study(slices=5, size=args.size, hot_lesion=True)
    mr, pt = dicom.sort_series(study["MR"]), dicom.sort_series(study["PT"])
    mri = dicom.window_series(mr, "mri")
    reals = [p.pixel_array * float(p.RescaleSlope) for p in pt]
    old = [hot_colormap(np.clip(r / np.percentile(np.concatenate([x.ravel() for x in reals]), 99.5), 0, 1))
           for r in reals]
    new = dicom.window_series(pt, "functional")
    fuser = InProcessFuser(open_pipeline(None, "cpu"))
    act = hot_lesion_pet(args.size)
    lesion, cortex = act == act.max(), act == 14_000.0
    k = len(pt) // 2  # the slice with the lesion
    fig, axes = plt.subplots(2, 3, figsize=(10, 7))
    for row, (name, func) in enumerate((("99.5th percentile (before)", old), ("full range (now)", new))):
        fused = fuser.fuse(mri[k : k + 1], func[k : k + 1], "pet")[0]
        for col, (img, title) in enumerate(((mri[k], "MR T2"), (func[k], f"PET, {name}"), (fused, "fused"))):
            axes[row, col].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            axes[row, col].set_title(title, fontsize=9)
            axes[row, col].axis("off")
        hot = fused.mean(-1)
        axes[row, 2].set_xlabel("")
        axes[row, 2].text(2, args.size - 4, f"lesion {hot[lesion].mean():.2f} vs cortex {hot[cortex].mean():.2f}",
                          color="cyan", fontsize=8)
    fig.suptitle("Hot spot (2.7x cortex uptake) through PACS windowing and fusion; value = mean(R, G, B)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
