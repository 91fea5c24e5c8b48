"""The reader defects found on 135 real series (#43), each shown on a synthetic series built to have it."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest

from harness.studies import new_study, series_from_volume
from models.volumes import phantom as pv
from models.volumes.fusion import InProcessFuser, fuse_volumes
from models.volumes.io import volume_from_datasets
from models.volumes.volume import GeometryError, Volume
from models.volumes.windowing import Window, mr_exposure_problem, mr_range, window_for


@pytest.fixture(scope="module")
def fast_fuser():
    from models.inference.weights import open_pipeline

    return InProcessFuser(open_pipeline("fast", "cpu"))


def _series(modality: str, slices: int = 5, slice_mm: float = 2.0, **kw) -> list:
    return series_from_volume(new_study(), pv.sample(modality, 24, 2.0, slices, slice_mm, **kw), 2)


def test_a_few_saturated_voxels_do_not_set_the_mr_window_and_a_dark_result_is_flagged(fast_fuser):
    """A field-map-like MR: the head at most ~760, 0.6% of the above-mean voxels saturated at 4095 in one slice's
    top rows. White was set at 4095 (fused median 25/255, anatomy invisible, no warning)."""
    mr = pv.sample("MR", 48, 4.0, 5, 4.0)
    head = mr.array > mr.array.mean()
    count = int(0.006 * head.sum()) + 1
    mr.array[2].flat[:count] = 4095.0  # the top rows of one slice
    lo, hi = mr_range(mr.array)
    assert hi < 1000, hi  # the head's brightest, not the saturated voxels
    window = window_for(mr, "mri")
    assert mr_exposure_problem(mr.array, window) is None
    assert np.median(window.apply(mr.array)[head]) > 0.4
    dark = Window(0.0, 40_000.0, hot=False)  # what a window at the stored maximum looks like
    assert "nearly black" in mr_exposure_problem(mr.array, dark)
    assert "nearly white" in mr_exposure_problem(mr.array, Window(0.0, 50.0, hot=False))
    pet = pv.sample("PT", 48, 4.0, 5, 4.0)
    fused = fuse_volumes(mr, pet, fast_fuser)
    assert fused.warnings == []
    mr.windows = [(0.0, 40_000.0)] * mr.shape[0]  # every slice agrees on a hopeless window: it is used, and flagged
    assert "nearly black" in fuse_volumes(mr, pet, fast_fuser).warnings[0]


def test_padding_values_are_left_out_of_the_mr_window():
    values = np.concatenate([np.full(5000, -2000.0), np.linspace(0, 500, 5000)])
    assert mr_range(values)[0] < -1000  # counted as data
    assert mr_range(values, padding=-2000.0)[0] >= 0


def test_an_rgb_mr_is_fused_as_its_luminance_and_written_on_one_colour_axis(fast_fuser):
    """XA30 colour FA maps: read and fused, then NIfTI writing failed on a (k, j, i, 3, 3) stack."""
    gray = pv.sample("MR", 24, 2.0, 4, 2.0)
    rgb = np.stack([gray.array, gray.array[:, ::-1], gray.array[:, :, ::-1]], -1) / gray.array.max()
    mr = Volume(rgb.astype(np.float32), gray.origin, gray.spacing, gray.direction, modality="MR")
    pet = pv.sample("PT", 24, 2.0, 4, 2.0)
    shown = window_for(mr, "mri").apply(mr.array)
    assert shown.shape == mr.shape
    np.testing.assert_allclose(shown, 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2], atol=1e-6)
    fused = fuse_volumes(mr, pet, fast_fuser)
    stack = fused.full_stack(shown)
    assert stack.shape == (*mr.shape, 3) and stack.dtype == np.uint8


def test_evenly_spaced_sparse_slices_are_a_volume_but_a_sparse_functional_is_not_interpolated(fast_fuser):
    """Siemens EPI: 3 mm slices 12 mm apart were refused as "missing slices?"; dcm2niix reads a 5-slice volume.
    The MR is never interpolated; a functional volume with such gaps would be, so it is refused."""
    mr_ds = _series("MR", slices=5, slice_mm=12.0)
    for ds in mr_ds:
        ds.SliceThickness = 3.0
    mr = volume_from_datasets(mr_ds)
    assert mr.shape[0] == 5 and mr.spacing[2] == pytest.approx(12.0) and mr.thickness == pytest.approx(3.0)
    pet = pv.sample("PT", 24, 2.0, 30, 2.0)
    assert len(fuse_volumes(mr, pet, fast_fuser).covered) == 5
    sparse_pet = volume_from_datasets([*_series("PT", slices=5, slice_mm=12.0)])
    sparse_pet.thickness = 3.0
    with pytest.raises(GeometryError, match="functional slices 12.00 mm apart but 3.00 mm thick"):
        fuse_volumes(mr, sparse_pet, fast_fuser)


def _two_per_position(**second) -> list:
    ds = _series("MR", slices=4)
    extra = []
    for d in ds:
        twin = copy.deepcopy(d)
        twin.SOPInstanceUID = d.SOPInstanceUID[:60] + ".2"
        twin.InstanceNumber = d.InstanceNumber + 100
        for key, value in second.items():
            setattr(twin, key, value)
        extra.append(twin)
    return ds + extra


def test_multi_echo_and_magnitude_phase_series_are_named_for_what_they_are():
    with pytest.raises(GeometryError) as echoes:
        volume_from_datasets(_two_per_position(EchoTime=200))
    assert "4-D: 2 echoes x 4 slices" in str(echoes.value) and "echo times 100, 200 ms" in str(echoes.value)
    with pytest.raises(GeometryError) as phase:
        volume_from_datasets(_two_per_position(ImageType=["ORIGINAL", "PRIMARY", "P", "ND"]))
    assert "images (magnitude/phase)" in str(phase.value) and "magnitude, phase" in str(phase.value)
    with pytest.raises(GeometryError) as time_points:
        volume_from_datasets(_two_per_position(TemporalPositionIdentifier=2))
    assert "4-D: 2 time points x 4 slices" in str(time_points.value)
    assert volume_from_datasets(_two_per_position(EchoTime=200), frame=1).array.shape[0] == 4


def test_nothing_depends_on_file_order_when_orientations_differ_in_the_last_digits():
    """A GE series whose files carry orientation vectors ~4e-8 apart gave 1-grey-level differences in 1,850
    voxels when the files were named in reverse: the orientation came from the first file by name."""
    ds = _series("MR", slices=8, orientation="sagittal")
    for n, d in enumerate(ds):
        iop = [float(v) for v in d.ImageOrientationPatient]
        d.ImageOrientationPatient = [v + (4e-8 * n if abs(v) < 0.5 else 0.0) for v in iop]
    volumes = [volume_from_datasets(order) for order in
               (ds, ds[::-1], random.Random(3).sample(ds, len(ds)))]
    for other in volumes[1:]:
        np.testing.assert_array_equal(other.direction, volumes[0].direction)
        np.testing.assert_array_equal(other.origin, volumes[0].origin)
        np.testing.assert_array_equal(other.array, volumes[0].array)
