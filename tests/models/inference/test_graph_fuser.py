"""The fast tier's shipped graph without torch (models/inference/graph_fuser.py): the same bytes as the torch
pipeline running that graph, a verified graph or none, when a one-shot command chooses it, and that such a
command never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from models.images.phantoms import phantom_inputs
from models.inference import graph_fuser
from models.inference.graph_fuser import SMALL_JOB_PIXELS, graph_pays, shipped_graph_fuser
from models.volumes.cli import estimated_pixels
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def graph():
    fuser = shipped_graph_fuser("fast", threads=2)
    assert fuser is not None
    return fuser


def test_graph_fuses_as_the_torch_pipeline_runs_the_same_graph():
    """Padding, tiling (a 300 px pair is 4 tiles), colour and provenance are the shared LumaFuser's; with the same
    graph and threads the pixels are identical, not only close."""
    import torch

    from models.inference.runtimes import use_runtime
    from models.inference.weights import open_pipeline

    torch_side = use_runtime(open_pipeline("fast", "cpu", precision="fp32"), "onnxruntime")
    graph = shipped_graph_fuser("fast", threads=torch.get_num_threads())
    pairs = phantom_inputs(2, 200, "pet") + phantom_inputs(1, 300, "ct")
    ours, theirs = graph.fuse(pairs), torch_side.fuse(pairs)
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(a.pixels, b.pixels) and a.modality == b.modality
    assert graph.provenance() == torch_side.provenance()
    assert graph.model_name == "dmfnet-fast" and graph.size_multiple == torch_side.size_multiple
    ours, theirs = graph.describe(), torch_side.describe()  # theirs adds the network's config
    assert {k: theirs[k] for k in ours if k != "chunk_size"} == {k: v for k, v in ours.items() if k != "chunk_size"}


def test_a_dropped_pair_is_not_fused(graph):
    pairs = phantom_inputs(3, 64, "pet")
    out = graph.fuse_lumas(pairs, alive=lambda i: i != 1)
    assert out[1] is None and out[0] is not None and out[2] is not None


def test_a_graph_that_does_not_verify_is_not_used(monkeypatch, caplog):
    files = graph_fuser.manifest_files()
    name = next(n for n, e in files.items() if e.get("graph_of") == "dmfnet_fast.pt")
    tampered = {**files, name: {**files[name], "sha256": "0" * 64}}
    monkeypatch.setattr(graph_fuser, "manifest_files", lambda: tampered)
    assert shipped_graph_fuser("fast") is None and "does not match weights.json" in caplog.text
    stale = {**files, "dmfnet_fast.pt": {**files["dmfnet_fast.pt"], "sha256": "1" * 64}}
    monkeypatch.setattr(graph_fuser, "manifest_files", lambda: stale)
    assert shipped_graph_fuser("fast") is None and "exported from other weights" in caplog.text
    assert shipped_graph_fuser("full") is None  # DM-FNet's graph needs its pipeline's noise input


@pytest.mark.parametrize(("args", "bf16", "expected"), [
    (("fast", None, "auto", None, 35 * 256 * 256), True, True),  # a small study on an AMX/AVX512-BF16 CPU
    (("fast", None, "auto", None, SMALL_JOB_PIXELS + 1), True, False),  # large: torch's bf16 kernels pay
    (("fast", None, "auto", None, None), True, False),  # unknown size (a folder of pairs)
    (("fast", None, "auto", None, 10**9), False, True),  # no fast bf16: the graph is the faster runtime anyway
    (("fast", None, "fp32", None, 10**9), True, True),
    (("fast", "cpu", "auto", "onnxruntime", 10**9), True, True),
    (("fast", None, "bf16", None, 1), False, False),  # asked for bf16: torch
    (("fast", None, "auto", "torch", 1), False, False),
    (("fast", None, "auto", "openvino", 1), False, False),
    (("fast", "cuda", "auto", None, 1), False, False),
    (("full", None, "auto", None, 1), False, False),
    ((None, None, "auto", None, 1), False, False),
])
def test_when_a_one_shot_command_runs_the_graph(monkeypatch, args, bf16, expected):
    monkeypatch.setattr(graph_fuser, "cpu_has_fast_bf16", lambda: bf16)
    assert graph_pays(*args) is expected


def test_study_size_is_told_from_disk_without_parsing(tmp_path):
    import gzip

    (tmp_path / "a.nii").write_bytes(bytes(1000))
    (tmp_path / "b.nii.gz").write_bytes(gzip.compress(bytes(200_000)))
    (tmp_path / "series").mkdir()
    for i in range(3):
        (tmp_path / "series" / f"{i}.dcm").write_bytes(bytes(300))
    assert estimated_pixels(str(tmp_path / "a.nii")) == 500
    assert estimated_pixels(str(tmp_path / "b.nii.gz")) == 100_000
    assert estimated_pixels(str(tmp_path / "series")) == 450
    assert estimated_pixels(str(tmp_path / "missing.nii.gz")) is None
    assert estimated_pixels(None) is None


@pytest.mark.slow
def test_a_one_shot_study_with_the_fast_tier_never_imports_torch(tmp_path):
    """The shell's `dmfnet fuse` of a small study: the graph, no torch (1.3-1.5 s of import here); the output is
    the torch fp32 pipeline's within one grey level."""
    import nibabel as nib

    from models.volumes import phantom as pv
    from models.volumes.nifti import save_nifti

    save_nifti(tmp_path / "t1.nii.gz", pv.sample("MR", 48, 2.0, 4, 3.0))
    save_nifti(tmp_path / "pet.nii.gz", pv.sample("PT", 24, 4.0, 3, 4.0))
    common = [str(tmp_path / "t1.nii.gz"), str(tmp_path / "pet.nii.gz"), "--modality", "pet", "--weights", "fast"]
    code = ("import sys, json; from dmfnet.cli import main; rc = main(sys.argv[1:]); "
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))")
    done = subprocess.run([sys.executable, "-c", code, "fuse", *common, "-o", str(tmp_path / "g.nii.gz")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"rc": 0, "torch": False}, done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "dmfnet", "fuse", *common, "--runtime", "torch", "--precision",
                           "fp32", "-o", str(tmp_path / "t.nii.gz")], cwd=ROOT, capture_output=True, timeout=300)
    assert done.returncode == 0

    def rgb(name: str) -> np.ndarray:
        a = np.asarray(nib.load(tmp_path / name).dataobj)
        return np.stack([a[c] for c in "RGB"], -1).astype(int)

    assert np.abs(rgb("g.nii.gz") - rgb("t.nii.gz")).max() <= 1
    assert json.loads((tmp_path / "g.json").read_text())["weights_sha256"] == \
        json.loads((tmp_path / "t.json").read_text())["weights_sha256"]
