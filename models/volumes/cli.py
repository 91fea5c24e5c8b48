"""``dmfnet fuse MRI FUNCTIONAL -o OUT`` on volumes: NIfTI files or DICOM series folders in, NIfTI or DICOM out.

The same geometry layer as the PACS commands: the functional volume is resampled onto the MR grid in mm
(registered first with ``--register rigid``), windowed as models/volumes/windowing.py says, fused along the MR's
slices in batches. Output is on the MR grid: NIfTI (RGB24 for PET/SPECT) with the MR's shape and affine,
the MR alone on slices the functional volume does not cover; or a folder of derived DICOM instances, one
per covered MR slice. A JSON sidecar next to a NIfTI output says what was fused and how.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DICOM_MODALITY = {"ct": "CT", "pet": "PT", "spect": "NM"}


def is_volume_input(path: str | None) -> bool:
    """True for a NIfTI file or a folder (a DICOM series)."""
    from models.volumes.nifti import is_nifti

    return bool(path) and (is_nifti(path) or Path(path).is_dir())


def estimated_pixels(path: str | None) -> int | None:
    """About how many voxels the volume at ``path`` holds, from its size on disk only (nothing is parsed):
    16-bit samples assumed, so float or compressed data misjudge it by ~2x, which only moves the one-shot
    command's runtime choice (:func:`models.inference.graph_fuser.graph_pays`). None when it cannot be told."""
    from models.volumes.nifti import is_nifti

    try:
        if path and is_nifti(path):
            with open(path, "rb") as f:
                if not str(path).lower().endswith(".gz"):
                    return f.seek(0, 2) // 2
                f.seek(-4, 2)  # gzip's trailer: the uncompressed size modulo 2**32
                return int.from_bytes(f.read(4), "little") // 2
        if path and Path(path).is_dir():
            return sum(e.stat().st_size for e in os.scandir(path) if e.is_file()) // 2
    except OSError:
        return None
    return None


def _read(path: str, modality: str, frame: int | None = None):
    """(Volume, DICOM datasets or None) from a NIfTI file or a DICOM series folder (``frame``: the time point of a
    4-D DICOM series)."""
    from models.volumes.io import read_dicom_folder
    from models.volumes.nifti import is_nifti, read_nifti
    from models.volumes.volume import GeometryError

    if is_nifti(path):
        return read_nifti(path, modality), None
    if not Path(path).is_dir():
        raise GeometryError(f"{path}: expected a .nii/.nii.gz file or a DICOM series folder")
    volume, datasets = read_dicom_folder(path, frame)
    if modality and volume.modality and volume.modality != modality:
        raise GeometryError(f"{path}: the series' Modality is {volume.modality}, not {modality}")
    return volume, datasets


def _functional_modality(path: str, modality: str | None) -> str:
    if modality:
        return DICOM_MODALITY[modality]
    from models.volumes.nifti import is_nifti
    from models.volumes.volume import GeometryError

    if is_nifti(path):
        raise GeometryError("a NIfTI functional volume carries no modality: give --modality ct|pet|spect")
    return ""


def _registration(args: argparse.Namespace, mr, func):
    """A checked rigid registration when asked for (or refuse different DICOM Frames of Reference)."""
    from models.volumes.registration import RegistrationLimits, register_rigid
    from models.volumes.volume import GeometryError, different_frames

    other_frame = different_frames(mr.frame_of_reference, func.frame_of_reference)  # NIfTI's is unknown: ""
    if args.register != "rigid":
        if other_frame:
            raise GeometryError("the two series have different FrameOfReferenceUIDs (not one patient coordinate "
                                "system): add --register rigid to register them")
        return None
    moving = func
    if args.register_via:
        moving, _ = _read(args.register_via, "")
    result = register_rigid(mr, moving, RegistrationLimits())
    print(f"registered: {result.describe()}", file=sys.stderr)
    return result


def read_inputs(mri: str, other: str, modality: str | None, frame: int | None, functional_frame: int | None,
                datasets: bool = True):
    """(MR volume, its datasets, functional volume, its datasets) of ``dmfnet fuse``'s two inputs; picklable, so
    :class:`~models.volumes.read_ahead.ReadAhead` can run it beside the model's loading. ``datasets`` False: None
    for both lists (only a DICOM output needs them; handing 35 datasets back costs the parent pydicom's import and
    ~14 MB of unpickling, ~0.25 s of a 2.5 s study)."""
    mr, mr_ds = _read(mri, "MR", frame)
    mr.modality = "MR"
    func, func_ds = _read(other, _functional_modality(other, modality), functional_frame)
    return (mr, mr_ds, func, func_ds) if datasets else (mr, None, func, None)


def _needs_datasets(args: argparse.Namespace) -> bool:
    from models.volumes.nifti import is_nifti

    return not is_nifti(args.output)  # a DICOM output derives its instances from the MR's datasets


def start_reading(args: argparse.Namespace):
    """The inputs of ``args`` read in a second process from now on (see models/volumes/read_ahead.py)."""
    from models.volumes.read_ahead import ReadAhead

    return ReadAhead(read_inputs, args.mri, args.other, args.modality, args.frame, args.functional_frame,
                     _needs_datasets(args))


def fuse_volume_files(args: argparse.Namespace, pipe, inputs=None) -> int:
    """Entry of ``dmfnet fuse`` for volume inputs (``inputs``: a :func:`start_reading` begun before the model
    was loaded, else they are read here); returns the exit code."""
    from tqdm import tqdm

    from models.volumes.fusion import InProcessFuser, fuse_volumes
    from models.volumes.nifti import is_nifti
    from models.volumes.volume import GeometryError

    try:
        read = (inputs.result() if inputs is not None else
                read_inputs(args.mri, args.other, args.modality, args.frame, args.functional_frame,
                            _needs_datasets(args)))
        mr, mr_ds, func, func_ds = read
        registration = _registration(args, mr, func)
        fuser = InProcessFuser(pipe, batch_size=args.batch_size)
        with tqdm(desc="fuse", unit="slice") as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done)

            fused = fuse_volumes(mr, func, fuser, registration=registration,
                                 functional_window=args.functional_window, batch_size=args.batch_size,
                                 progress=progress)
        if is_nifti(args.output):
            _write_nifti(args, mr, func, fused, pipe)
        else:
            _write_dicom(args, mr, mr_ds, func, func_ds, fused, pipe)
    except GeometryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for warning in fused.warnings:
        print(f"warning: {warning} (written anyway; check the output)", file=sys.stderr)
    print(f"wrote {args.output} ({fused.modality}, MR {fused.range_text(mr.shape[0])} fused"
          + (", registered" if registration else "") + ")")
    return 0


def _summary(args, mr, func, fused, pipe) -> dict:
    return {"derived": "DM-FNet fusion - NOT FOR PRIMARY DIAGNOSIS", "mri": str(args.mri),
            "functional": str(args.other), "modality": fused.modality,
            "fused_slices": fused.range_text(mr.shape[0]), "fused_slice_indices": [fused.covered[0], fused.covered[-1]],
            "registration": fused.registration.describe() if fused.registration else None,
            "model": pipe.model_name, "weights_sha256": str(pipe.weights_sha256 or pipe.weights_path),
            "functional_window": args.functional_window, "warnings": fused.warnings}


def _write_nifti(args, mr, func, fused, pipe) -> None:
    from models.volumes.nifti import write_nifti
    from models.volumes.windowing import window_for

    stack = fused.full_stack(window_for(mr, "mri").apply(mr.array))
    write_nifti(args.output, mr, stack, f"DM-FNet MR+{func.modality} {fused.range_text(mr.shape[0])}; DERIVED, "
                                        "not for diagnosis")
    sidecar = Path(str(args.output).removesuffix(".gz").removesuffix(".nii") + ".json")
    sidecar.write_text(json.dumps(_summary(args, mr, func, fused, pipe), indent=2) + "\n")


def _write_dicom(args, mr, mr_ds, func, func_ds, fused, pipe) -> None:
    from models.volumes import dicom
    from models.volumes.volume import GeometryError

    if not mr_ds:
        raise GeometryError("DICOM output needs a DICOM MR series (a NIfTI has no patient or study to derive "
                            "from): write .nii.gz instead")
    func_series = str(func_ds[0].SeriesInstanceUID) if func_ds else dicom.uuid_uid(str(args.other))
    weights = str(pipe.weights_sha256 or pipe.weights_path)
    series_uid = dicom.derived_series_uid(str(mr_ds[0].StudyInstanceUID), str(mr_ds[0].SeriesInstanceUID),
                                             func_series, weights)
    info = dicom.derived_info(series_uid, str(mr_ds[0].SeriesInstanceUID), func_series, mr, func, fused,
                                 pipe.model_name, weights, args.functional_window)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for ds in dicom.derived_series(mr_ds, mr, func_series, func, fused, info):
        ds.save_as(out / f"IM_{int(ds.InstanceNumber):04d}.dcm", enforce_file_format=True)


def add_volume_args(f: argparse.ArgumentParser) -> None:
    """Flags of ``dmfnet fuse`` that only volumes use."""
    f.add_argument("--register", choices=["none", "rigid"], default="none",
                   help="volumes: register the functional volume to the MR (rigid, mutual information; checked)")
    f.add_argument("--register-via", help="volumes: register this CT (same space as the functional) instead")
    f.add_argument("--functional-window", choices=["full", "suv", "series"], default="full",
                   help="volumes: PET/SPECT grey levels (see docs/pacs.md)")
    f.add_argument("--frame", type=int, default=None, metavar="N",
                   help="volumes: time point N (0-based, acquisition order) of a 4-D MR series (fMRI, multi-echo)")
    f.add_argument("--functional-frame", type=int, default=None, metavar="N",
                   help="volumes: time point N of a 4-D functional series (dynamic PET frames)")

