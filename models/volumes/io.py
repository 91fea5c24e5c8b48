"""DICOM series in: datasets from a PACS, a spool or a folder -> :class:`Volume` (NIfTI: models/volumes/nifti.py).

DICOM geometry comes from each image's ImagePositionPatient / ImageOrientationPatient / PixelSpacing (or, for
Enhanced multi-frame images, the same attributes in the per-frame and shared functional groups; Siemens mosaics
are unpacked into their slices by :mod:`models.volumes.mosaic`). A series is refused, with the problem named,
when it cannot be one regular volume: mixed orientations, pixel grids or modalities, several images at one
position ("4-D: N time points / echoes / images (magnitude/phase) x M slices", or duplicates), slices not stacked
along their normal (tilt or shear), or uneven slice steps (a missing slice): resampling across a gap would invent
anatomy, so we refuse rather than guess. Even steps wider than the slices (a sparse 2-D protocol: 3 mm slices
12 mm apart) are a volume as dcm2niix reads them; whether such a volume may be *interpolated* is the fusion's
question (models/volumes/fusion.py refuses it for the functional volume, which is resampled; the MR never is).
Rescale Slope/Intercept are applied per slice (values stay quantitative). Nothing depends on
the order of the files or of the PACS's answer: series-level attributes are read from the first slice along
the normal (the header) or from all slices (modality, slice thickness, each slice's window). Pixels are decoded
only for the frames a volume uses: a folder's files are parsed with their pixel data left on disk, so a 4-D
series of thousands of files is refused from its headers, and ``frame`` decodes one time point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from models.volumes.mosaic import is_mosaic, unpack_mosaic
from models.volumes.volume import MAX_VOXELS, GeometryError, Volume
from models.volumes.windowing import dicom_window, first_value

POSITION_TOLERANCE_MM = 0.01
STACK_DRIFT_MM = 0.1  # in-plane offset of a slice from the stack's axis that still counts as a straight stack
STEP_TOLERANCE = 0.01  # relative variation of the slice step that still counts as uniform


@dataclass
class _Frame:
    """One 2-D image of a series with its place in the patient and the instance it came from; its pixels are
    decoded only when asked for (:class:`_InstancePixels`), so a series refused from its headers decodes none."""

    load: Callable[[], np.ndarray]
    shape: tuple[int, ...]  # (rows, columns) or (rows, columns, 3), from the header
    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]  # (between rows, between columns), as PixelSpacing
    slope: float
    intercept: float
    source: tuple[str, str]
    instance: Dataset
    window: tuple[float, float] | None = None  # (lo, hi) of the image's own WindowCenter/Width
    thickness: float | None = None
    order: int = 0  # frame number inside its instance (a tie-breaker only)
    when: tuple = ()  # acquisition order among images at the same position (time point of a 4-D series)

    @property
    def pixels(self) -> np.ndarray:
        """The frame's stored values (decoded on first use of its instance)."""
        return self.load()


class _InstancePixels:
    """One instance's pixel data, decoded on first use and shared by its frames; RGB as [0, 1] floats."""

    def __init__(self, ds: Dataset, rgb: bool) -> None:
        self.ds, self.rgb, self.array = ds, rgb, None

    def __call__(self) -> np.ndarray:
        if self.array is None:
            pixels = _pixels(self.ds)
            self.array = pixels.astype(np.float32) / (2 ** int(self.ds.BitsStored) - 1) if self.rgb else pixels
        return self.array


def _attr(groups, seq: str, name: str):
    """``groups.<seq>[0].<name>`` or None."""
    items = getattr(groups, seq, None) if groups is not None else None
    return getattr(items[0], name, None) if items else None


def _acquisition_order(ds: Dataset) -> tuple:
    """Sort key of an instance among those at the same position: temporal position, acquisition time, trigger
    time, instance number (what scanners fill in for time series, echoes and dynamic frames)."""
    def number(name: str) -> float:
        value = first_value(ds.get(name))
        return value if value is not None else 0.0

    acquired = str(ds.get("AcquisitionTime", "") or "")
    return (number("TemporalPositionIdentifier"), acquired, number("TriggerTime"), number("EchoTime"),
            number("InstanceNumber"))


def _thickness(v) -> float | None:
    t = first_value(v)
    return t if t and t > 0 else None


def _pixels(ds: Dataset) -> np.ndarray:
    """The decoded pixel data (pydicom with the pylibjpeg plugins: every lossless transfer syntax), or a
    GeometryError naming the transfer syntax that could not be decoded."""
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom raises several types (no decoder, corrupt stream, bad length)
        meta = getattr(ds, "file_meta", None)
        syntax = getattr(getattr(meta, "TransferSyntaxUID", None), "name", None) or "unknown transfer syntax"
        raise GeometryError(f"pixel data cannot be decoded ({syntax}): {type(exc).__name__}") from None


def _frames(ds: Dataset) -> list[_Frame]:
    """The frames of one instance: one for a classic image, every tile of a Siemens mosaic, NumberOfFrames
    for an Enhanced one."""
    count = int(getattr(ds, "NumberOfFrames", 1) or 1)
    source = (str(getattr(ds, "SOPClassUID", "")), str(getattr(ds, "SOPInstanceUID", "")))
    rgb = getattr(ds, "PhotometricInterpretation", "") == "RGB"
    pixels = _InstancePixels(ds, rgb)
    shape = (int(ds.Rows), int(ds.Columns), *((3,) if rgb else ()))
    slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
    window = dicom_window(ds.get("WindowCenter"), ds.get("WindowWidth"))
    when = _acquisition_order(ds)
    if count == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        if is_mosaic(ds):  # its slices are tiles of the decoded image: decoded now
            tiles, positions, _ = unpack_mosaic(ds, pixels())
            return [_Frame(lambda t=t: t, t.shape, p, ds.get("ImageOrientationPatient"), ds.get("PixelSpacing"),
                           slope, intercept, source, ds, window, _thickness(ds.get("SliceThickness")), n, when)
                    for n, (t, p) in enumerate(zip(tiles, positions, strict=True))]
        return [_Frame(pixels, shape, ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"),
                       ds.get("PixelSpacing"), slope, intercept, source, ds, window,
                       _thickness(ds.get("SliceThickness")), 0, when)]
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != count:
        raise GeometryError(f"multi-frame image has {count} frames but {len(per_frame)} per-frame groups")
    out = []
    for f, groups in enumerate(per_frame):
        def pick(seq: str, name: str, groups=groups):
            value = _attr(groups, seq, name)
            return value if value is not None else _attr(shared, seq, name)

        slope, intercept = pick("PixelValueTransformationSequence", "RescaleSlope"), pick(
            "PixelValueTransformationSequence", "RescaleIntercept")
        out.append(_Frame(lambda f=f: pixels().reshape((count, *shape))[f], shape,
                          pick("PlanePositionSequence", "ImagePositionPatient"),
                          pick("PlaneOrientationSequence", "ImageOrientationPatient"),
                          pick("PixelMeasuresSequence", "PixelSpacing"),
                          float(slope if slope is not None else 1), float(intercept or 0), source, ds,
                          dicom_window(pick("FrameVOILUTSequence", "WindowCenter"),
                                  pick("FrameVOILUTSequence", "WindowWidth")),
                          _thickness(pick("PixelMeasuresSequence", "SliceThickness")), f,
                          (int(pick("FrameContentSequence", "TemporalPositionIndex") or 0), *when, f)))
    return out


def _check_same(frames: list[_Frame]) -> tuple[np.ndarray, np.ndarray]:
    """Orientation (6,) and spacing (2,) shared by all frames (those of the frame with the lowest SOP Instance UID:
    never the first file by name, so files differing by ~1e-8 give the same volume in any order), else
    :class:`GeometryError`."""
    missing = [name for name, ok in (("ImagePositionPatient", all(f.position is not None for f in frames)),
                                     ("ImageOrientationPatient", all(f.orientation is not None for f in frames)),
                                     ("PixelSpacing", all(f.spacing is not None for f in frames))) if not ok]
    if missing:
        raise GeometryError(f"images without {', '.join(missing)}: they cannot be placed in patient space")
    reference = min(range(len(frames)), key=lambda n: (frames[n].source[1], frames[n].order))
    iop = np.array([np.asarray(f.orientation, float) for f in frames])
    if iop.ndim != 2 or iop.shape[1] != 6 or np.abs(iop - iop[reference]).max() > 1e-3:
        kinds = len({tuple(np.round(o, 3)) for o in iop}) if iop.ndim == 2 else len(frames)
        raise GeometryError(f"mixed orientations inside one series ({kinds} different ImageOrientationPatient)")
    spacing = np.array([np.asarray(f.spacing, float) for f in frames])
    shapes = {f.shape for f in frames}
    if len(shapes) > 1 or np.abs(spacing - spacing[reference]).max() > 1e-4:
        raise GeometryError("images of one series differ in matrix size or PixelSpacing")
    return iop[reference], spacing[reference]


def _one_image_per_position(frames: list[_Frame], along: np.ndarray, frame: int | None) -> list[_Frame]:
    """The frames of one 3-D volume. Several images at one position are a 4-D series (the same count at every
    position: time points, echoes, b-values, dynamic frames): refused naming its shape, or time point ``frame``
    (0-based, in acquisition order; negative counts from the last) is taken; uneven counts are duplicates,
    refused. ``frames`` sorted along."""
    starts = np.flatnonzero(np.diff(along) >= POSITION_TOLERANCE_MM) + 1
    bounds = np.concatenate([[0], starts, [len(along)]])
    counts = np.diff(bounds)
    if counts.max() == 1 and not frame:
        return frames
    if counts.min() != counts.max() or (len(counts) == 1 and counts[0] > 1):
        raise GeometryError(f"{int(counts.max())} images share a slice position (duplicated instances, or a 4-D "
                            "series with uneven frames?): split the series so each position has one image")
    if frame is None:
        kind, picks = _what_repeats(frames[bounds[0]:bounds[1]])
        raise GeometryError(f"4-D: {counts[0]} {kind} x {len(counts)} slices ({counts[0]} images per position): one "
                            f"3-D volume is needed; --frame N (0-based) picks {picks}, or export one as its own "
                            "series")
    if not -counts[0] <= frame < counts[0]:
        raise GeometryError(f"--frame {frame}: the series has {counts[0]} time point(s), 0 to {counts[0] - 1}")
    frame %= counts[0]  # -1: the last
    return [sorted(frames[a:b], key=lambda f: f.when)[frame] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _is_phase(ds: Dataset) -> bool:
    value = ds.get("ImageType") or []
    values = [str(v).upper() for v in (value if isinstance(value, (list, tuple)) or hasattr(value, "__iter__")
                                       and not isinstance(value, str) else [value])]
    return "P" in values or "PHASE" in values


def _what_repeats(same_position: list[_Frame]) -> tuple[str, str]:
    """What the images at one position differ by, named for a refusal: (kind, what ``--frame N`` picks)."""
    ordered = sorted(same_position, key=lambda f: f.when)
    phases = [_is_phase(f.instance) for f in ordered]
    if any(phases):
        names = ", ".join("phase" if p else "magnitude" for p in phases)
        return "images (magnitude/phase)", f"the N-th in acquisition order ({names})"
    echoes = [first_value(f.instance.get("EchoTime")) for f in ordered]
    if None not in echoes and len(set(echoes)) == len(echoes):
        return "echoes", "echo N+1 (echo times " + ", ".join(f"{e:g}" for e in echoes) + " ms)"
    return "time points", "time point N in acquisition order (temporal position, acquisition time, trigger time)"


def _consensus_modality(datasets: list[Dataset]) -> str:
    modalities = sorted({str(getattr(d, "Modality", "")) for d in datasets})
    if len(modalities) > 1:
        raise GeometryError(f"one series with several modalities ({', '.join(modalities)}): refused")
    return modalities[0]


def volume_from_datasets(datasets: list[Dataset], frame: int | None = None) -> Volume:
    """:func:`volume_of`, with a malformed value in the headers (a position that is no number, a sequence that is
    empty, ...: pydicom keeps what it cannot convert) refused as a :class:`GeometryError` naming no value."""
    try:
        return volume_of(datasets, frame)
    except GeometryError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError) as exc:
        raise GeometryError(f"malformed attribute in the series' headers ({type(exc).__name__}): refused") from None


def volume_of(datasets: list[Dataset], frame: int | None = None) -> Volume:
    """A DICOM series (any order, classic, mosaic or Enhanced multi-frame) -> :class:`Volume`; see the module
    docstring. Nothing depends on the order of ``datasets``: frames are sorted along the slice normal (ties by
    SOP Instance UID and frame number), series-level attributes come from the first slice in that order or
    from a consensus of all of them, and every slice's own window is kept for :mod:`models.volumes.windowing`."""
    if not datasets:
        raise GeometryError("empty series")
    modality = _consensus_modality(datasets)
    frames = [f for ds in datasets for f in _frames(ds)]
    iop, pixel_spacing = _check_same(frames)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    frames.sort(key=lambda f: (round(float(np.dot(np.asarray(f.position, float), normal)), 4), f.source[1], f.order))
    along = np.array([np.asarray(f.position, float) for f in frames]) @ normal
    frames = _one_image_per_position(frames, along, frame)
    pos = np.array([np.asarray(f.position, float) for f in frames])
    along = pos @ normal
    steps = np.diff(along)
    drift = (pos - pos[0]) - np.outer(along - along[0], normal)
    if np.abs(drift).max() > STACK_DRIFT_MM:
        raise GeometryError("slices are not stacked along their normal (gantry tilt or sheared stack)")
    if len(steps) and (steps.max() - steps.min()) > STEP_TOLERANCE * steps.mean() + POSITION_TOLERANCE_MM:
        raise GeometryError(f"non-uniform slice spacing ({steps.min():.2f} to {steps.max():.2f} mm: a missing "
                            "slice?); refused rather than interpolated across the gap")
    thicknesses = [f.thickness for f in frames if f.thickness]
    thickness = float(np.median(thicknesses)) if thicknesses else 0.0  # one odd instance cannot decide
    step = float(steps.mean()) if len(steps) else (thickness or 1.0)
    shape = frames[0].shape
    if len(frames) * shape[0] * shape[1] > MAX_VOXELS:
        raise GeometryError(f"series of {len(frames)} x {shape[1]}x{shape[0]} exceeds {MAX_VOXELS} voxels")
    rgb = len(shape) == 3
    array = np.stack([f.pixels if rgb else f.pixels.astype(np.float32) * np.float32(f.slope)
                      + np.float32(f.intercept) for f in frames]).astype(np.float32)
    first = frames[0].instance
    return Volume(array, pos[0], (pixel_spacing[1], pixel_spacing[0], step), np.column_stack([row, col, normal]),
                  modality=modality, frame_of_reference=str(getattr(first, "FrameOfReferenceUID", "")),
                  header=first, sources=[f.source for f in frames], windows=[f.window for f in frames],
                  thickness=thickness)


class DicomReadError(ValueError):
    """A file that is not readable DICOM (the message names the problem, never a tag's value)."""


PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData


def parse_dicom(source: bytes | str | Path, defer_pixels: bool = False) -> Dataset:
    """One DICOM file (bytes or a path) parsed by pydicom, every element but the pixel data read once so that a
    malformed value is refused here, not later inside the geometry; :class:`DicomReadError` otherwise (OSError:
    the path is unreadable). ``defer_pixels`` (a path): the pixel data stays on disk until a frame is used, so a
    series refused from its headers (4-D, gaps, mixed) costs its headers only."""
    import io

    import pydicom

    if not isinstance(source, bytes):
        with open(source, "rb"):  # FileNotFoundError, PermissionError: the caller's to handle
            pass
    try:
        ds = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source,
                             defer_size="64 KB" if defer_pixels and not isinstance(source, bytes) else None)
        for element in ds.iterall():  # pydicom converts values lazily: a bad one raises on first access
            if element.tag not in PIXEL_DATA_TAGS:
                element.value  # noqa: B018
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types (OSError included) for malformed bytes
        raise DicomReadError(f"not readable DICOM ({type(exc).__name__})") from None
    return ds


def read_dicom_bytes(files: list[bytes], frame: int | None = None) -> Volume:
    """One series from the bytes of its files (the DICOM node's spool, the fuzzer)."""
    return volume_from_datasets([parse_dicom(data) for data in files], frame)


def read_dicom_folder(folder: str | Path, frame: int | None = None) -> tuple[Volume, list[Dataset]]:
    """One DICOM series from a folder (searched recursively; files that are not DICOM are ignored)."""
    files = [p for p in sorted(Path(folder).rglob("*")) if p.is_file()]
    datasets = []
    for path in files:
        try:
            datasets.append(parse_dicom(path, defer_pixels=True))
        except (DicomReadError, OSError):
            continue
    datasets = [d for d in datasets if "PixelData" in d]
    if not datasets:
        raise GeometryError(f"{folder}: no DICOM images found")
    series = {str(d.get("SeriesInstanceUID", "")) for d in datasets}
    if len(series) > 1:
        raise GeometryError(f"{folder}: holds {len(series)} series; give the folder of one series")
    return volume_from_datasets(datasets, frame), datasets
