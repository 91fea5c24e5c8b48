"""The volume CLI reads its inputs in a second process while the model loads (models/volumes/read_ahead.py):
same volumes as reading here, no torch in the reader, its failures raised here as they would have been."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest

from models.volumes import phantom as pv
from models.volumes.cli import read_inputs
from models.volumes.nifti import save_nifti
from models.volumes.read_ahead import ReadAhead


def torch_imported_after(path_mr: str, path_pet: str) -> tuple[bool, object]:
    """Read a pair as the CLI does; report whether that imported torch."""
    volumes = read_inputs(path_mr, path_pet, "pet", None, None)
    return "torch" in sys.modules, volumes


class Unpicklable(Exception):
    """Carries a lock: it cannot cross a pipe."""

    def __init__(self) -> None:
        super().__init__("held a lock")
        self.lock = threading.Lock()


def raise_unpicklable() -> None:
    raise Unpicklable()


def die() -> None:
    os._exit(7)


def _refuse_to_load() -> None:
    raise ValueError("not here")


class LoadsNowhere:
    """Pickles in the child; unpickling it (in the parent) raises."""

    def __reduce__(self):  # noqa: ANN204
        return _refuse_to_load, ()


def return_unloadable() -> LoadsNowhere:
    return LoadsNowhere()


def sleep_long() -> None:
    import time

    time.sleep(60)


@pytest.fixture
def pair(tmp_path):
    save_nifti(tmp_path / "t1.nii.gz", pv.sample("MR", 24, 2.0, 6, 2.0))
    save_nifti(tmp_path / "pet.nii.gz", pv.sample("PT", 12, 4.0, 4, 4.0))
    return str(tmp_path / "t1.nii.gz"), str(tmp_path / "pet.nii.gz")


def test_the_reader_process_imports_no_torch_and_reads_what_this_process_reads(pair):
    torch_there, (mr, mr_ds, func, func_ds) = ReadAhead(torch_imported_after, *pair).result()
    here = read_inputs(*pair, "pet", None, None)
    assert torch_there is False
    assert np.array_equal(mr.array, here[0].array) and np.array_equal(func.array, here[2].array)
    assert np.allclose(mr.origin, here[0].origin) and np.allclose(func.direction, here[2].direction)
    assert func.modality == here[2].modality == "PT"
    assert mr_ds is None and func_ds is None


def test_the_readers_failures_are_raised_here(tmp_path, pair):
    from models.volumes.volume import GeometryError

    with pytest.raises(GeometryError, match="missing: expected a .nii"):
        ReadAhead(read_inputs, str(tmp_path / "missing"), pair[1], "pet", None, None).result()
    with pytest.raises(GeometryError, match="--modality"):
        ReadAhead(read_inputs, *pair, None, None, None).result()
    with pytest.raises(RuntimeError, match="Unpicklable: held a lock"):
        ReadAhead(raise_unpicklable).result()
    with pytest.raises(RuntimeError, match="exited"):
        ReadAhead(die).result()
    with pytest.raises(RuntimeError, match="answer could not be read: ValueError: not here"):
        ReadAhead(return_unloadable).result()


def test_close_stops_a_reader_whose_result_is_never_taken():
    ahead = ReadAhead(sleep_long)
    ahead.close()
    assert not ahead._proc.is_alive()


def test_the_cli_reports_a_missing_input_read_in_the_other_process(tmp_path, pair, capsys):
    from dmfnet.cli import main

    code = main(["fuse", pair[0], str(tmp_path / "nope.nii.gz"), "--modality", "pet", "--weights", "fast",
                 "--runtime", "torch", "-o", str(tmp_path / "o.nii.gz")])  # torch: read in the other process
    assert code == 1 and "nope.nii.gz: not a readable NIfTI file" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()


def test_datasets_come_back_only_when_asked(tmp_path):
    """A NIfTI output needs no DICOM datasets: the reader leaves them out (the parent then neither imports pydicom
    nor unpickles ~14 MB for the real T1); a DICOM output gets them."""
    from harness.studies import new_study, series_from_volume

    (tmp_path / "mr").mkdir()
    for i, ds in enumerate(series_from_volume(new_study(1), pv.sample("MR", 16, 2.0, 3, 2.0), 1)):
        ds.save_as(tmp_path / "mr" / f"{i}.dcm", enforce_file_format=True)
    save_nifti(tmp_path / "pet.nii.gz", pv.sample("PT", 8, 4.0, 2, 4.0))
    args = (str(tmp_path / "mr"), str(tmp_path / "pet.nii.gz"), "pet", None, None)
    with_ds = ReadAhead(read_inputs, *args, True).result()
    without = ReadAhead(read_inputs, *args, False).result()
    assert len(with_ds[1]) == 3 and with_ds[3] is None  # the PET is a NIfTI: it has none
    assert without[1] is None and without[3] is None
    assert np.array_equal(with_ds[0].array, without[0].array)
    assert without[0].frame_of_reference == with_ds[0].frame_of_reference != ""
