"""The geometry layer: volumes placed in patient space (mm), resampled onto the MR grid, registered when asked.

Every phantom is defined in LPS millimetres (models/volumes/phantom.py): the hot lesion sits at a known point,
and after fusion it must come out there (within one functional voxel), as the hottest region of its slice.
"""

from __future__ import annotations

import copy
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from harness.studies import new_study, series_from_volume
from models.volumes import phantom as pv
from models.volumes.fusion import InProcessFuser, fuse_volumes
from models.volumes.io import volume_from_datasets
from models.volumes.nifti import read_nifti, save_nifti, write_nifti
from models.volumes.registration import RegistrationLimits, RegistrationRefused, register_rigid
from models.volumes.volume import GeometryError, Volume, covered_slices, resample_onto, same_grid
from tests.lesion import assert_lesion_in_place, hot_centroid

# (MR grid, functional grid): the study shapes the issue lists, as sample() arguments
SHAPES = {
    "pet_shifted_fov": (dict(size=256, pixel_mm=0.94, slices=40, slice_mm=1.0, centre=[0, 0, 5]),
                        dict(modality="PT", size=128, pixel_mm=2.6, slices=24, slice_mm=2.03, centre=[10, -5, 0])),
    "sagittal_mr": (dict(size=128, pixel_mm=1.5, slices=60, slice_mm=1.5, orientation="sagittal"),
                    dict(modality="PT", size=128, pixel_mm=2.6, slices=24, slice_mm=2.03)),
    "oblique_mr": (dict(size=160, pixel_mm=1.2, slices=30, slice_mm=1.5, tilt_deg=3.0, centre=[0, 0, 5]),
                   dict(modality="PT", size=128, pixel_mm=2.6, slices=24, slice_mm=2.03)),
    "spect": (dict(size=256, pixel_mm=0.94, slices=40, slice_mm=1.0, centre=[0, 0, 5]),
              dict(modality="NM", size=64, pixel_mm=4.4, slices=24, slice_mm=4.4)),
    "partial_z": (dict(size=128, pixel_mm=1.8, slices=40, slice_mm=1.0, centre=[0, 0, 5]),
                  dict(modality="PT", size=128, pixel_mm=2.6, slices=10, slice_mm=2.03, centre=[0, 0, 10])),
}


def study_volumes(shape: str) -> tuple[Volume, Volume]:
    """(MR, functional) of one named study shape."""
    mr_grid, func_grid = SHAPES[shape]
    func_grid = dict(func_grid)
    return pv.sample("MR", **mr_grid), pv.sample(func_grid.pop("modality"), **func_grid)


@pytest.fixture(scope="module")
def fast_fuser():
    from models.inference.weights import open_pipeline

    return InProcessFuser(open_pipeline("fast", "cpu"))


def test_lesion_read_back_finds_the_lesion_under_a_bright_rim_and_follows_a_displaced_one():
    """The tests' read-back of the lesion (tests/lesion.py) on a merged image: a bright MR rim over the tracer
    (where the old channel-by-channel clipping turned warm tracer yellow, and read hot) does not move it; a real
    hot region does, wherever it is."""
    from models.images.colour import hot_colormap, merge_luma, split_luma
    from models.images.imaging import DecodedImage, to_uint

    yy, xx = np.mgrid[:64, :64]
    v = np.where(np.hypot(yy - 32, xx - 32) < 28, 0.45, 0.0)
    v[np.hypot(yy - 20, xx - 40) <= 4] = 0.9  # the lesion: 49 pixels
    mr = np.where(np.abs(np.hypot(yy - 32, xx - 32) - 26) < 1.5, 0.98, 0.35).astype(np.float32)  # bright skull rim

    def fused(v: np.ndarray) -> np.ndarray:
        _, chroma = split_luma(DecodedImage(hot_colormap(v.astype(np.float32)), 8))
        return to_uint(merge_luma(mr, chroma))

    centre, hot_v, rest_v = hot_centroid(fused(v))
    assert np.allclose(centre, (40, 20), atol=0.5) and hot_v > rest_v + 0.4
    v[np.hypot(yy - 44, xx - 20) <= 4] = 0.9  # a second, equal hot region elsewhere moves the centroid
    assert np.allclose(hot_centroid(fused(v))[0], (30, 32), atol=0.5)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_lesion_lands_at_its_physical_position(shape, fast_fuser):
    mr, func = study_volumes(shape)
    # through DICOM headers and back, so the geometry read from IPP/IOP/PixelSpacing is what is tested
    study = new_study(1)
    mr = volume_from_datasets(series_from_volume(study, mr, 1))
    func = volume_from_datasets(series_from_volume(study, func, 2, slope_per_slice=True))
    fused = fuse_volumes(mr, func, fast_fuser)
    assert_lesion_in_place(mr, fused, float(func.spacing[:2].max()), pv.LESION_LPS)
    if shape == "partial_z":  # MR slices outside the PET's extent are not produced
        z = mr.to_physical(np.array([[0, 0, k] for k in fused.covered]))[:, 2]
        assert 0 < len(fused.covered) < mr.shape[0] and z.min() >= -0.2 and z.max() <= 20.2
        assert fused.range_text(mr.shape[0]) == f"slices {fused.covered[0] + 1}-{fused.covered[-1] + 1} of 40"


def test_dicom_geometry_round_trip_in_mm(tmp_path):
    vol = pv.sample("PT", 32, 2.6, 7, 2.03, orientation="sagittal", tilt_deg=3.0, centre=[4, -3, 2])
    series = series_from_volume(new_study(), vol, 2)
    back = volume_from_datasets(list(reversed(series)))  # any arrival order
    for i, ds in enumerate(series):  # SimpleITK (GDCM) reading the same files places them identically
        ds.save_as(tmp_path / f"{i}.dcm", enforce_file_format=True)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    ref = reader.Execute()
    np.testing.assert_allclose(back.origin, ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(back.direction.ravel(), ref.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(back.spacing, ref.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-3)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-3)
    np.testing.assert_allclose(back.direction, vol.direction, atol=1e-5)
    np.testing.assert_allclose(back.array, vol.array, rtol=1e-3, atol=vol.array.max() / 30000)


def test_same_grid_is_not_resampled():
    mr = pv.sample("MR", 32, 1.0, 4, 3.0)
    pet = pv.sample("PT", 32, 1.0, 4, 3.0)
    assert same_grid(mr, pet) and resample_onto(pet, mr) is pet.array  # the very same values, bit for bit
    shifted = pv.sample("PT", 32, 1.0, 4, 3.0, centre=[10, 0, 0])
    assert not same_grid(mr, shifted)
    moved = resample_onto(shifted, mr)  # a 10 mm in-plane shift is resampled, never fused pixel to pixel
    np.testing.assert_allclose(moved[:, :, 15:], shifted.array[:, :, 5:22], atol=1e-3)


def test_nifti_ras_and_lps_agree_with_simpleitk(tmp_path):
    """A known voxel's place in mm: our NIfTI reader (RAS -> LPS) against SimpleITK reading the same file."""
    affine = np.array([[-0.9, 0.05, 0, 100.0], [0.05, 0.9, 0, -120.0], [0, 0, 2.0, -40.0], [0, 0, 0, 1]])
    data = np.arange(8 * 9 * 5, dtype=np.float32).reshape(8, 9, 5)
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    nib.save(img, tmp_path / "a.nii.gz")
    vol = read_nifti(tmp_path / "a.nii.gz")
    ref = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    for ijk in ([0, 0, 0], [7, 8, 4], [3, 2, 1]):
        ras = affine @ [*ijk, 1]
        ours = vol.to_physical(np.array([ijk]))[0]
        np.testing.assert_allclose(ours, [-ras[0], -ras[1], ras[2]], atol=1e-4)
        np.testing.assert_allclose(ours, ref.TransformContinuousIndexToPhysicalPoint(ijk), atol=1e-3)
        assert vol.array[ijk[2], ijk[1], ijk[0]] == data[tuple(ijk)]
    # and back out: the fused NIfTI carries the reference grid (SimpleITK reads the same geometry)
    write_nifti(tmp_path / "out.nii.gz", vol, np.zeros((*vol.shape, 3)), "test")
    out = sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), atol=1e-5)
    assert nib.load(tmp_path / "out.nii.gz").get_data_dtype().names == ("R", "G", "B")  # RGB24


@pytest.fixture(scope="module")
def other_frame():
    """PET/CT in a second scanner's coordinates (rotated 2/-3/4 deg, moved 15/-20/25 mm) and the MR."""
    m = pv.rigid((2.0, -3.0, 4.0), (15.0, -20.0, 25.0))
    mr = pv.sample("MR", 128, 1.6, 48, 2.0)
    ct = pv.sample("CT", 128, 1.8, 50, 2.0, centre=[15, -20, 25], scanner_from_patient=m)
    pet = pv.sample("PT", 96, 2.6, 40, 2.6, centre=[15, -20, 25], scanner_from_patient=m)
    return mr, ct, pet, m


@pytest.mark.slow
def test_registration_via_ct_puts_the_pet_lesion_in_place(other_frame, fast_fuser):
    mr, ct, pet, m = other_frame
    reg = register_rigid(mr, ct)
    truth = m[:3, :3] @ pv.LESION_LPS + m[:3, 3]
    assert np.linalg.norm(np.subtract(reg.transform.TransformPoint(tuple(pv.LESION_LPS)), truth)) < 1.0
    assert reg.rotation_deg == pytest.approx(5.4, abs=0.5) and reg.metric_final < reg.metric_start
    assert "CT to MR" in reg.describe() and "NMI" in reg.describe()
    fused = fuse_volumes(mr, pet, fast_fuser, registration=reg)
    assert_lesion_in_place(mr, fused, 2.6, pv.LESION_LPS)
    again = register_rigid(mr, ct)  # deterministic
    assert again.transform.GetParameters() == reg.transform.GetParameters()
    unregistered = fuse_volumes(mr, pet, fast_fuser)  # ignoring the frames puts the lesion ~40 mm off
    with pytest.raises(AssertionError):
        assert_lesion_in_place(mr, unregistered, 2.6, pv.LESION_LPS)


@pytest.mark.slow
def test_an_already_aligned_pair_registers_to_identity():
    """Nothing to gain is no failure: the metric may end a hair worse from sampling noise."""
    mr = pv.sample("MR", 128, 1.5, 40, 1.5)  # what `dmfnet sample --volumes` writes
    pet = pv.sample("PT", 64, 3.0, 20, 3.0, centre=[4, -3, 0])
    reg = register_rigid(mr, pet)
    assert reg.rotation_deg < 1.0 and np.linalg.norm(reg.transform.GetTranslation()) < 1.0


@pytest.mark.slow
def test_implausible_registrations_are_refused(other_frame):
    mr, ct, _, _ = other_frame
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    noise = Volume(gaussian_filter(rng.normal(size=ct.shape), 3).astype(np.float32) * 1000, ct.origin, ct.spacing,
                   ct.direction, modality="CT")
    with pytest.raises(RegistrationRefused, match="normalised mutual information"):
        register_rigid(mr, noise)
    turned = pv.sample("CT", 128, 1.8, 50, 2.0, scanner_from_patient=pv.rigid((0, 0, 40), (0, 0, 0)))
    with pytest.raises(RegistrationRefused, match="three starts ended"):  # a local optimum, not an answer
        register_rigid(mr, turned)
    tilted = pv.sample("CT", 128, 1.8, 50, 2.0, scanner_from_patient=pv.rigid((10, 0, 0), (0, 0, 0)))
    assert register_rigid(mr, tilted).rotation_deg == pytest.approx(10, abs=1)
    with pytest.raises(RegistrationRefused, match="rotation 10.* > 5"):
        register_rigid(mr, tilted, RegistrationLimits(max_rotation_deg=5))


def _series(modality="PT", slices=6, **kw):
    return series_from_volume(new_study(), pv.sample(modality, 16, 2.0, slices, 2.0, **kw), 2)


@pytest.mark.parametrize("damage, problem", [
    ("duplicate", "share a slice position"),
    ("missing_middle", "a missing slice"),
    ("uneven", "non-uniform slice spacing"),
    ("mixed_orientation", "mixed orientations"),
    ("no_position", "without ImagePositionPatient"),
    ("mixed_matrix", "matrix size or PixelSpacing"),
])
def test_irregular_series_are_refused_naming_the_problem(damage, problem):
    ds = sorted(_series(), key=lambda d: float(d.ImagePositionPatient[2]))
    if damage == "duplicate":  # two echoes at one position
        ds.append(ds[2].copy())
    elif damage == "missing_middle":
        ds = ds[:3] + ds[4:5]
    elif damage == "uneven":
        ds[-1].ImagePositionPatient = [*ds[-1].ImagePositionPatient[:2], float(ds[-1].ImagePositionPatient[2]) + 1.2]
    elif damage == "mixed_orientation":
        ds[1].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    elif damage == "no_position":
        del ds[3].ImagePositionPatient
    elif damage == "mixed_matrix":
        ds[2].PixelSpacing = [1.5, 1.5]
    with pytest.raises(GeometryError, match=problem):
        volume_from_datasets(ds)


def test_enhanced_multiframe_is_read_through_its_functional_groups():
    from pydicom.dataset import Dataset

    classic = sorted(_series(slices=4), key=lambda d: float(d.ImagePositionPatient[2]))
    enh = copy.deepcopy(classic[0])
    enh.NumberOfFrames = len(classic)
    enh.PixelData = b"".join(d.PixelData for d in classic)
    for name in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope",
                 "RescaleIntercept"):
        delattr(enh, name)
    shared = Dataset()
    orient, measures = Dataset(), Dataset()
    orient.ImageOrientationPatient = classic[0].ImageOrientationPatient
    measures.PixelSpacing, measures.SliceThickness = classic[0].PixelSpacing, classic[0].SliceThickness
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [orient], [measures]
    enh.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for d in reversed(classic):  # frames in any order: position decides
        item, pos, rescale = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = d.ImagePositionPatient
        rescale.RescaleSlope, rescale.RescaleIntercept = d.RescaleSlope, d.RescaleIntercept
        item.PlanePositionSequence, item.PixelValueTransformationSequence = [pos], [rescale]
        frames.append(item)
    enh.PixelData = b"".join(d.PixelData for d in reversed(classic))
    enh.PerFrameFunctionalGroupsSequence = frames
    a, b = volume_from_datasets(classic), volume_from_datasets([enh])
    np.testing.assert_allclose(b.array, a.array)
    np.testing.assert_allclose(b.origin, a.origin)
    del enh.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence
    with pytest.raises(GeometryError, match="without ImagePositionPatient"):
        volume_from_datasets([enh])


def test_nifti_refusals(tmp_path):
    four_d = nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4))
    nib.save(four_d, tmp_path / "4d.nii.gz")
    with pytest.raises(GeometryError, match="3-D volume is needed"):
        read_nifti(tmp_path / "4d.nii.gz")
    no_affine = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), None)
    no_affine.set_qform(None, code=0)
    no_affine.set_sform(None, code=0)
    nib.save(no_affine, tmp_path / "noaff.nii")
    with pytest.raises(GeometryError, match="no valid affine"):
        read_nifti(tmp_path / "noaff.nii")
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b not really")
    with pytest.raises(GeometryError, match="not a readable NIfTI"):
        read_nifti(tmp_path / "bad.nii.gz")


def test_volumes_that_do_not_meet_are_refused(fast_fuser):
    mr = pv.sample("MR", 32, 2.0, 8, 2.0)
    far = pv.sample("PT", 32, 2.0, 8, 2.0, centre=[0, 0, 200])
    assert covered_slices(far, mr) == []
    with pytest.raises(GeometryError, match="does not overlap"):
        fuse_volumes(mr, far, fast_fuser)
    beside = pv.sample("PT", 32, 2.0, 8, 2.0, centre=[300, 0, 0])  # same slab, nowhere near in-plane
    with pytest.raises(GeometryError, match="does not overlap"):
        fuse_volumes(mr, beside, fast_fuser)


# ---------------------------------------------------------------------------------------------- dmfnet fuse
def test_cli_fuses_a_nifti_pair_onto_the_mr_grid(tmp_path, capsys):
    from dmfnet.cli import main

    mr, pet = study_volumes("partial_z")
    save_nifti(tmp_path / "t1.nii.gz", mr)
    save_nifti(tmp_path / "pet.nii.gz", pet)
    out = tmp_path / "fused.nii.gz"
    rc = main(["fuse", str(tmp_path / "t1.nii.gz"), str(tmp_path / "pet.nii.gz"), "--modality", "pet",
               "-o", str(out), "--weights", "fast"])
    assert rc == 0, capsys.readouterr().err
    img = nib.load(out)
    np.testing.assert_allclose(img.affine, nib.load(tmp_path / "t1.nii.gz").affine, atol=1e-4)
    assert img.shape == mr.shape[::-1] and img.get_data_dtype().names == ("R", "G", "B")
    assert b"not for diagnosis" in img.header["descrip"].tobytes()
    sidecar = json.loads((tmp_path / "fused.json").read_text())
    first, last = sidecar["fused_slice_indices"]
    assert 0 < first < last < mr.shape[0] - 1 and sidecar["modality"] == "pet"
    back = read_nifti(out)
    rgb = back.array / 1.0
    fused = type("F", (), {"covered": list(range(first, last + 1)),
                           "slices": [rgb[k] for k in range(first, last + 1)]})
    assert_lesion_in_place(back, fused, 2.6, pv.LESION_LPS)
    gray = rgb[0]  # outside the PET's extent: the MR alone (gray, R = G = B)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and gray.max() > 0.5


def test_cli_refuses_a_4d_nifti_and_a_missing_modality(tmp_path, capsys):
    from dmfnet.cli import main

    mr = pv.sample("MR", 16, 2.0, 4, 2.0)
    save_nifti(tmp_path / "t1.nii.gz", mr)
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 4, 2), np.float32), np.eye(4)), tmp_path / "dyn.nii.gz")
    args = ["fuse", str(tmp_path / "t1.nii.gz"), str(tmp_path / "dyn.nii.gz"), "-o", str(tmp_path / "o.nii.gz"),
            "--weights", "fast"]
    assert main(args) == 1 and "--modality" in capsys.readouterr().err
    assert main([*args, "--modality", "pet"]) == 1 and "3-D volume is needed" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.slow
def test_cli_dicom_folders_in_and_out_with_registration(tmp_path, other_frame, capsys):
    import pydicom

    from dmfnet.cli import main

    mr, ct, pet, _ = other_frame
    study = new_study(3)
    for name, vol, number, frame in (("mr", mr, 1, None), ("ct", ct, 2, "1.2.3.9"), ("pet", pet, 3, "1.2.3.9")):
        (tmp_path / name).mkdir()
        for i, ds in enumerate(series_from_volume(study, vol, number, frame_of_reference=frame)):
            ds.save_as(tmp_path / name / f"{i}.dcm", enforce_file_format=True)
    args = ["fuse", str(tmp_path / "mr"), str(tmp_path / "pet"), "-o", str(tmp_path / "out"), "--weights", "fast"]
    assert main(args) == 1 and "--register rigid" in capsys.readouterr().err  # other Frame of Reference
    to_nifti = [*args[:3], "-o", str(tmp_path / "out.nii.gz"), *args[5:]]  # read without the datasets: same rule
    assert main(to_nifti) == 1 and "--register rigid" in capsys.readouterr().err
    assert main([*args, "--register", "rigid", "--register-via", str(tmp_path / "ct")]) == 0
    assert "CT to MR" in capsys.readouterr().err
    stored = sorted((pydicom.dcmread(p) for p in (tmp_path / "out").iterdir()), key=lambda d: d.InstanceNumber)
    assert stored and "Registered: rigid registration (CT to MR" in stored[0].DerivationDescription
    assert "NOT FOR PRIMARY DIAGNOSIS" in stored[0].ImageComments
    assert stored[0].FrameOfReferenceUID == study.FrameOfReferenceUID  # the MR's space, where the output lies
