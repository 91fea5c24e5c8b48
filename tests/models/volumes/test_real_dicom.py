"""Real scanners' series (../shared/data/real_dicom): the product reads each as dcm2niix does, or refuses it.

Every series found there is checked the same way, so another vendor's series dropped into that folder is
covered without a new test: dcm2niix (the field's reference converter) reads it independently; where it makes
one 3-D image, ours must have the same voxel centres (0.01 mm) and the same values after rescale, read the same
whatever the order of its files, window without saturating the head, and fuse with a PET placed in mm so that
the lesion comes out within one PET voxel (through ``dmfnet fuse``, the CLI entry point). Where dcm2niix makes
a 4-D image, ours must refuse it naming "4-D", exit 1 and write nothing.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.volumes import phantom as pv
from models.volumes.io import volume_from_datasets
from models.volumes.nifti import read_nifti, save_nifti
from models.volumes.volume import GeometryError, Volume
from models.volumes.windowing import agreed_window, window_for
from tests.conftest import ROOT
from tests.lesion import assert_lesion_in_place
from tests.reference_reader import compare_with_dcm2niix, dcm2niix_read, have_dcm2niix

REAL = ROOT.parent / "shared" / "data" / "real_dicom"
PET_MM = 2.6  # the PET grid placed around each MR: the lesion must come out within one of its voxels
HEAD_CLIP_LIMIT = 0.006  # the MR window rule clips at most 0.5% of the head's voxels (module doc of windowing)


def _series_groups() -> dict[str, list[Path]]:
    """{"folder[/series number]": files} for every DICOM series under REAL (one folder may hold several)."""
    groups: dict[str, list[Path]] = {}
    if not REAL.is_dir():
        return groups
    for folder in sorted(p for p in REAL.iterdir() if p.is_dir()):
        by_series: dict[tuple[str, str], list[Path]] = {}
        for path in sorted(folder.rglob("*")):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # README files, licences: not DICOM
                continue
            if "SeriesInstanceUID" in ds:
                by_series.setdefault((str(ds.SeriesInstanceUID), str(ds.get("SeriesNumber", ""))), []).append(path)
        for (_, number), files in sorted(by_series.items(), key=lambda kv: kv[0][1]):
            groups[folder.name if len(by_series) == 1 else f"{folder.name}/{number}"] = files
    return groups


SERIES = _series_groups()
pytestmark = [pytest.mark.system, pytest.mark.skipif(not SERIES, reason=f"no real DICOM under {REAL}"),
              pytest.mark.skipif(not have_dcm2niix(), reason="dcm2niix not installed (scripts/install-test-deps.sh)")]


def _folder_of(files: list[Path], tmp: Path) -> Path:
    """A folder holding exactly this series (links), for the readers that take folders."""
    tmp.mkdir(parents=True, exist_ok=True)
    for n, path in enumerate(files):
        (tmp / f"{n:05d}_{path.name}").symlink_to(path)
    return tmp


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """dcm2niix's images of every series (once per session)."""
    base = tmp_path_factory.mktemp("dcm2niix")
    return {name: dcm2niix_read(_folder_of(files, base / name.replace("/", "_"))) for name, files in SERIES.items()}


def _datasets(name: str) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in SERIES[name]]


@pytest.mark.parametrize("name", sorted(SERIES))
def test_read_as_dcm2niix_reads_it_or_refused_naming_why(name, reference):
    images = reference[name]
    assert images, f"dcm2niix made nothing of {name}"
    three_d = [(d, a) for d, a in images if d.ndim == 3 or (d.ndim == 4 and d.shape[3] == 1)]
    if len(images) == 1 and three_d:
        volume = volume_from_datasets(_datasets(name))
        data, affine = three_d[0]
        got = compare_with_dcm2niix(volume, data.reshape(data.shape[:3]), affine)
        assert got["centre_mm"] <= 0.01 and got["value"] <= 1e-3 * max(1.0, float(np.abs(volume.array).max())), got
    else:  # dcm2niix made a 4-D image (or several): not one volume, so ours must say so
        with pytest.raises(GeometryError) as refused:
            volume_from_datasets(_datasets(name))
        frames = images[0][0].shape[3] if images[0][0].ndim == 4 else len(images)
        assert "4-D" in str(refused.value) and f"{frames} time points" in str(refused.value), str(refused.value)
        if len(images) == 1:  # one 4-D image: each time point, chosen with frame=t, is dcm2niix's volume t
            data, affine = images[0]
            shuffled = _datasets(name)[::-1]
            for t in sorted({0, frames // 2, frames - 1}):
                got = compare_with_dcm2niix(volume_from_datasets(shuffled, frame=t), data[..., t], affine)
                assert got["centre_mm"] <= 0.01 and got["value"] <= 1e-3, (t, got)
            with pytest.raises(GeometryError, match=f"has {frames} time point"):
                volume_from_datasets(shuffled, frame=frames)


def _readable() -> list[str]:
    """The series dcm2niix reads as one 3-D volume (decided without running it: at most one image per position)."""
    out = []
    for name in sorted(SERIES):
        try:
            volume_from_datasets([pydicom.dcmread(p) for p in SERIES[name]])
        except GeometryError:
            continue
        out.append(name)
    return out


READABLE = _readable()


@pytest.mark.parametrize("name", READABLE)
def test_nothing_depends_on_file_order_and_the_head_does_not_saturate(name):
    datasets = _datasets(name)
    first = volume_from_datasets(datasets)
    window = window_for(first, "mri")
    for seed in range(3):
        shuffled = datasets[:]
        random.Random(seed).shuffle(shuffled)
        again = volume_from_datasets(shuffled)
        np.testing.assert_array_equal(again.array, first.array)
        assert again.header.SOPInstanceUID == first.header.SOPInstanceUID and again.sources == first.sources
        assert window_for(again, "mri") == window
    head = first.array > first.array.mean()
    clipped = float((window.apply(first.array)[head] >= 1.0).mean())
    assert clipped <= HEAD_CLIP_LIMIT, f"{clipped:.2%} of the head's voxels saturate under {window}"


def test_per_slice_automatic_windows_do_not_window_the_series():
    """Siemens writes its own automatic window on every slice: no single slice's window is the series'."""
    varied = [n for n in READABLE if len({w for w in volume_from_datasets(_datasets(n)).windows}) > 1]
    if not varied:
        pytest.skip("no real series with per-slice windows here")
    for name in varied:
        volume = volume_from_datasets(_datasets(name))
        assert agreed_window(volume) is None
        lo, hi = window_for(volume, "mri").lo, window_for(volume, "mri").hi
        assert all((w[0], w[1]) != (lo, hi) for w in volume.windows)


def pet_around(mr: Volume, truth_lps: np.ndarray) -> Volume:
    """The PET of models/volumes/phantom.py around ``mr`` on a :data:`PET_MM` grid, lesion at ``truth_lps``."""
    return pv.pet_around(mr, truth_lps, PET_MM)


@pytest.mark.parametrize("name", READABLE)
def test_fused_through_the_cli_with_the_lesion_in_place(name, tmp_path):
    from dmfnet.cli import main

    folder = _folder_of(SERIES[name], tmp_path / "mr")
    mr = volume_from_datasets(_datasets(name))
    k = mr.shape[0] // 2
    truth = mr.to_physical(np.array([[mr.shape[2] // 2 + 4, mr.shape[1] // 2 - 3, k]], float))[0]
    save_nifti(tmp_path / "pet.nii.gz", pet_around(mr, truth))
    out = tmp_path / "fused.nii.gz"
    code = main(["fuse", str(folder), str(tmp_path / "pet.nii.gz"), "--modality", "pet", "--weights", "fast",
                 "-o", str(out)])
    assert code == 0
    fused = read_nifti(out)
    view = type("Fused", (), {"covered": list(range(fused.shape[0])), "slices": list(fused.array)})
    found = assert_lesion_in_place(mr, view, PET_MM, truth)
    assert found["error_mm"] <= PET_MM
    # The derived DICOM series lies on the MR's slices too (a mosaic's header places the tiled image, not a slice).
    assert main(["fuse", str(folder), str(tmp_path / "pet.nii.gz"), "--modality", "pet", "--weights", "fast",
                 "-o", str(tmp_path / "dicom")]) == 0
    derived = volume_from_datasets([pydicom.dcmread(p) for p in sorted((tmp_path / "dicom").iterdir())])
    assert derived.shape[:3] == mr.shape[:3]
    np.testing.assert_allclose(derived.origin, mr.origin, atol=1e-3)
    np.testing.assert_allclose(derived.direction, mr.direction, atol=1e-5)
    np.testing.assert_allclose(derived.spacing, mr.spacing, atol=1e-3)


def test_one_time_point_of_a_4d_series_fuses_through_the_cli(tmp_path):
    from dmfnet.cli import main

    four_d = [n for n in sorted(set(SERIES) - set(READABLE)) if "4-D" in _refusal(n)]
    if not four_d:
        pytest.skip("no 4-D series here")
    name = four_d[0]
    mr = volume_from_datasets(_datasets(name), frame=1)
    k = mr.shape[0] // 2
    truth = mr.to_physical(np.array([[mr.shape[2] // 2 + 4, mr.shape[1] // 2 - 3, k]], float))[0]
    save_nifti(tmp_path / "pet.nii.gz", pet_around(mr, truth))
    out = tmp_path / "fused.nii.gz"
    assert main(["fuse", str(_folder_of(SERIES[name], tmp_path / "mr")), str(tmp_path / "pet.nii.gz"), "--modality",
                 "pet", "--weights", "fast", "--frame", "1", "-o", str(out)]) == 0
    fused = read_nifti(out)
    view = type("Fused", (), {"covered": list(range(fused.shape[0])), "slices": list(fused.array)})
    assert_lesion_in_place(mr, view, PET_MM, truth)


def _refusal(name: str) -> str:
    try:
        volume_from_datasets(_datasets(name))
    except GeometryError as exc:
        return str(exc)
    return ""


@pytest.mark.parametrize("name", sorted(set(SERIES) - set(READABLE)))
def test_refused_through_the_cli_with_one_line_and_nothing_written(name, tmp_path, capsys):
    from dmfnet.cli import main

    folder = _folder_of(SERIES[name], tmp_path / "mr")
    mr_like = Volume(np.zeros((4, 8, 8), np.float32), [0, 0, 0], [1, 1, 1], np.eye(3), modality="PT")
    save_nifti(tmp_path / "pet.nii.gz", mr_like)
    out = tmp_path / "fused.nii.gz"
    code = main(["fuse", str(folder), str(tmp_path / "pet.nii.gz"), "--modality", "pet", "--weights", "fast",
                 "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and not out.exists()
    assert len([line for line in err if line.startswith("error:")]) == 1 and "Traceback" not in "\n".join(err)


def test_every_lossless_transfer_syntax_decodes_to_identical_pixels(tmp_path):
    """The corpus's five syntaxes, and the same image re-encoded by dcmtk (JPEG-LS, deflated) and pydicom with
    OpenJPEG (JPEG 2000 lossless): one volume, bit for bit."""
    syntaxes = [n for n in SERIES if n.startswith("transfer_syntaxes/")]
    if not syntaxes:
        pytest.skip("no transfer_syntaxes series here")
    volumes = {n: volume_from_datasets(_datasets(n)) for n in syntaxes}
    base = volumes[syntaxes[0]].array
    for name, volume in volumes.items():
        np.testing.assert_array_equal(volume.array, base, err_msg=name)
    for path in transcoded(SERIES[syntaxes[0]][0], tmp_path).values():
        np.testing.assert_array_equal(volume_from_datasets([pydicom.dcmread(path)]).array, base, err_msg=path.name)


def transcoded(source: Path, folder: Path) -> dict[str, Path]:
    """``source`` re-encoded into the lossless syntaxes the corpus lacks: {transfer syntax UID: file}."""
    import subprocess

    from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    if shutil.which("dcmcjpls") and shutil.which("dcmconv"):
        subprocess.run(["dcmcjpls", "+el", str(source), str(folder / "jpegls.dcm")], check=True, capture_output=True)
        subprocess.run(["dcmconv", "+td", str(source), str(folder / "deflated.dcm")], check=True, capture_output=True)
        out[JPEGLSLossless] = folder / "jpegls.dcm"
        out[DeflatedExplicitVRLittleEndian] = folder / "deflated.dcm"
    ds = pydicom.dcmread(source)
    ds.compress(JPEG2000Lossless)
    ds.save_as(folder / "j2k.dcm")
    out[JPEG2000Lossless] = folder / "j2k.dcm"
    for uid, path in out.items():
        assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == uid
    return out
