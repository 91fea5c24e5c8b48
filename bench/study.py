"""A study end to end: the real 35-slice Siemens T1 of ../shared/data/real_dicom with a PET NIfTI placed in mm,
``dmfnet fuse MR PET -o out.nii.gz --modality pet`` from the shell (each run a new process), side by side with
the 2-D pipeline fusing the same number of 256 px pairs in this process, for each tier.

    python bench/study.py [--series DIR] [--tiers fast,full] [--runs 3] [--json OUT]

Prints, per tier: the shell wall time of each run and its peak memory (the child's max RSS), the 2-D pipeline's
time for the same slices, the target (full: 1.1x that + 2 s; fast: 2.0 s), beside it the same command another
way (fast: ``--runtime torch``, as the fast tier ran before its shipped graph ran without torch; full: reading the
inputs in the model's process, without the read-ahead), and where the time goes: the
interpreter with the CLI's imports (``dmfnet fuse --help``), and the study in this process with imports and
weights already paid (what the running service or ``pacs listen`` spends). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.inference.hardware import describe_cpu  # noqa: E402
from models.volumes import phantom as pv  # noqa: E402
from models.volumes.io import read_dicom_folder  # noqa: E402
from models.volumes.nifti import save_nifti  # noqa: E402

SERIES = ROOT.parent / "shared" / "data" / "real_dicom" / "siemens_t1_sag_hfs"
TARGET_FAST_S = 2.0
# The same command with the volumes read in the model's process (before the read-ahead), for the comparison.
# Exits as the shell's command does (dmfnet.cli.run), so that only the reading differs.
READ_HERE = "import models.cli; models.cli.READ_AHEAD = False; from dmfnet.cli import run; run()"


def timed_child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one child process; raises if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def pet_nifti(series: Path | None, out: Path) -> int:
    """Write the PET around the MR (lesion near its centre); returns the MR's slice count. ``series`` None: the
    MR is a phantom NIfTI (256 px, 35 slices of 4.8 mm, as the real T1) written beside it as mr.nii.gz."""
    if series is None:
        mr = pv.sample("MR", 256, 1.0, 35, 4.8, orientation="sagittal")
        save_nifti(out.parent / "mr.nii.gz", mr)
    else:
        mr, _ = read_dicom_folder(series)
    centre = mr.to_physical(np.array([[mr.shape[2] // 2 + 4, mr.shape[1] // 2 - 3, mr.shape[0] // 2]], float))[0]
    save_nifti(out, pv.pet_around(mr, centre))
    return mr.shape[0]


def pipeline_seconds(weights: str, slices: int, size: int, batch: int) -> float:
    """The 2-D pipeline on ``slices`` prepared 256 px PET pairs in batches of ``batch`` (best of 2, warm), with
    freed memory kept for reuse as ``dmfnet fuse`` has it (models/inference/hardware.py)."""
    from models.images.phantoms import phantom_inputs
    from models.inference.hardware import keep_freed_memory
    from models.inference.weights import open_pipeline

    keep_freed_memory()
    pipe = open_pipeline(weights)
    pairs = phantom_inputs(slices, size)
    best = float("inf")
    for _ in range(3):  # the first is the warm-up
        t0 = time.perf_counter()
        for i in range(0, slices, batch):
            pipe.fuse(pairs[i : i + batch])
        best = min(best, time.perf_counter() - t0)
    return best


def in_process_seconds(weights: str, series: Path, pet: Path, out: Path) -> float:
    """The study through the CLI's own function in this process, imports and weights paid (best of 2, warm), with
    freed memory kept for reuse as the shell's ``dmfnet fuse`` and the 2-D pipeline have it."""
    from dmfnet.cli import build_parser
    from models.inference.hardware import keep_freed_memory
    from models.inference.weights import open_pipeline
    from models.volumes.cli import fuse_volume_files

    keep_freed_memory()
    pipe = open_pipeline(weights)
    args = build_parser("fuse").parse_args(["fuse", str(series), str(pet), "--modality", "pet", "--weights", weights,
                                      "-o", str(out)])
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            code = fuse_volume_files(args, pipe)
        if code != 0:
            raise SystemExit("the in-process study failed")
        best = min(best, time.perf_counter() - t0)
    return best


def in_a_child(fn, *args):  # noqa: ANN001, ANN201 - any of this module's measurements
    """``fn(*args)`` in a spawned process: this one stays small, so the next tier's shell children (forked from
    it) do not inherit a loaded model's RSS in their peak (a fast-tier run once showed 1.19 GB that way)."""
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def main() -> int:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--series", type=Path, default=SERIES)
    ap.add_argument("--phantom", action="store_true", help="a phantom MR NIfTI instead (no ../shared here)")
    ap.add_argument("--tiers", default="fast,full")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8, help="the CLI's default")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.phantom and not args.series.is_dir():
        print(f"error: {args.series} not found (../shared/data/real_dicom)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="dmfnet-study-"))
    slices = pet_nifti(None if args.phantom else args.series, tmp / "pet.nii.gz")
    mr_input = tmp / "mr.nii.gz" if args.phantom else args.series
    py = sys.executable
    help_s = [timed_child([py, "-m", "dmfnet", "fuse", "--help"])[0] for _ in range(args.runs)]
    doc: dict = {"cpu": describe_cpu(), "python": platform.python_version(),
                 "series": "phantom" if args.phantom else args.series.name,
                 "slices": slices, "cli_help_s": [round(s, 2) for s in help_s], "tiers": {}}
    print(f"{doc['cpu']}; {doc['series']}: {slices} slices; `dmfnet fuse --help` "
          + " / ".join(f"{s:.2f}" for s in help_s) + " s")
    for tier in args.tiers.split(","):
        fuse = ["fuse", str(mr_input), str(tmp / "pet.nii.gz"), "--modality", "pet", "--weights", tier,
                "-o", str(tmp / f"{tier}.nii.gz")]
        shell, other = [], []
        other_cmd, other_name = [py, "-c", READ_HERE, *fuse], "reading in the model's process"
        if tier == "fast":  # the default is the shipped graph without torch where that pays (graph_fuser.py)
            other_cmd, other_name = [py, "-m", "dmfnet", *fuse, "--runtime", "torch"], "torch (read-ahead)"
        for _ in range(args.runs):  # interleaved, so that the VM's drift falls on both alike
            shell.append(timed_child([py, "-m", "dmfnet", *fuse]))
            other.append(timed_child(other_cmd))
        two_d = in_a_child(pipeline_seconds, tier, slices, 256, args.batch_size)
        warm = in_a_child(in_process_seconds, tier, mr_input, tmp / "pet.nii.gz", tmp / f"{tier}-warm.nii.gz")
        target = TARGET_FAST_S if tier == "fast" else 1.1 * two_d + 2.0
        walls = [w for w, _ in shell]
        row = {"shell_s": [round(w, 2) for w in walls], "peak_rss_mb": [round(m) for _, m in shell],
               "other": other_name, "other_s": [round(w, 2) for w, _ in other],
               "other_peak_rss_mb": [round(m) for _, m in other],
               "pipeline_2d_s": round(two_d, 2), "in_process_warm_s": round(warm, 2), "target_s": round(target, 2),
               "median_over_target": round(float(np.median(walls)) / target, 3)}
        doc["tiers"][tier] = row
        print(f"{tier:<5} shell {' / '.join(f'{w:.2f}' for w in walls)} s (peak {max(row['peak_rss_mb'])} MB; "
              f"{other_name} {' / '.join(f'{w:.2f}' for w, _ in other)} s)  "
              f"2-D pipeline {two_d:.2f} s  in-process warm {warm:.2f} s  target {target:.2f} s  "
              f"median/target {row['median_over_target']:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
