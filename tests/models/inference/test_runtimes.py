"""ONNX export and the alternative runtimes: parity with torch on the validation pairs (<= 1/255 mean absolute
difference), the Triton repository, the CLI flags and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from dmfnet.cli import main
from models.evaluation.report import load_prepared
from models.images.pair_input import PairInput
from models.images.phantoms import phantom_inputs, phantom_pair
from models.inference import runtimes
from models.inference.runtimes import RuntimeUnavailable, default_runtime, exported_graph, use_runtime
from models.inference.weights import open_pipeline
from tests.conftest import ROOT

HARVARD = ROOT.parent / "shared" / "data" / "harvard"


def _validation_pairs(per_task: int | None) -> list[PairInput]:
    """Prepared validation-split pairs (``per_task`` of each task, all when None); phantoms without the data."""
    if not HARVARD.is_dir():
        return phantom_inputs(2, 256, "pet") + phantom_inputs(1, 256, "ct") + phantom_inputs(1, 200, "spect")
    from models.images.pairs import spread_per_task
    from models.training.data import load_split

    val = load_split(HARVARD, ROOT / "configs" / "harvard_split.json")["val"]
    return [load_prepared(p) for p in (spread_per_task(val, per_task) if per_task else val)]


def _mad(a: list, b: list) -> float:
    return float(np.mean([np.abs(x.pixels - y.pixels).mean() for x, y in zip(a, b, strict=True)]))


@pytest.mark.slow
@pytest.mark.parametrize(("weights", "per_task"), [("fast", None), ("full", 1)])
def test_shipped_graphs_match_torch_on_validation_pairs(weights, per_task, tmp_path, monkeypatch):
    """The graphs shipped in weights/ are what ONNX Runtime and OpenVINO run for the shipped weights: no export
    at start, and within 1/255 of torch on validation pairs."""
    monkeypatch.setenv("DMFNET_CACHE_DIR", str(tmp_path))
    pairs = _validation_pairs(per_task)
    reference = open_pipeline(weights, "cpu").fuse(pairs)
    for runtime in ("onnxruntime", "openvino"):
        pipe = use_runtime(open_pipeline(weights, "cpu"), runtime)
        assert pipe.describe()["runtime"] == runtime
        mad = _mad(pipe.fuse(pairs), reference)
        assert mad <= 1 / 255, f"{weights} on {runtime}: mean |onnx - torch| = {mad * 255:.3f}/255"
    assert list(tmp_path.iterdir()) == []  # nothing exported
    # where ONNX Runtime is the default (an fp32 pipeline), the shipped weights start on it at once, no export
    monkeypatch.delenv("DMFNET_RUNTIME", raising=False)
    assert use_runtime(open_pipeline(weights, "cpu", precision="fp32"), None).runtime == "onnxruntime"
    assert list(tmp_path.iterdir()) == []


def test_every_shipped_weights_file_has_its_graph():
    """A re-shipped weights file without `scripts/ship_weights.py --graphs` fails here, not at a user's start."""
    import json

    from models.inference.kinds import WEIGHTS_DIR
    from models.inference.manifest import MANIFEST
    from models.inference.runtimes import graph_name, shipped_graph

    files = json.loads(MANIFEST.read_text())["files"]
    for name in [n for n in files if n.endswith(".pt")]:
        pipe = open_pipeline(str(WEIGHTS_DIR / name), "cpu")
        graph = shipped_graph(pipe)
        assert graph is not None and graph.name == graph_name(pipe) and files[graph.name]["graph_of"] == name
        meta = {p.key: p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props}
        assert meta["weights_sha256"] == pipe.weights_sha256 and meta["model"] == pipe.model_name


@pytest.mark.slow
def test_export_cli_writes_onnx_with_provenance_and_a_triton_repository(tmp_path, capsys):
    out = tmp_path / "tiny.onnx"
    assert main(["export", "--weights", "random:tiny", "-o", str(out), "--triton", str(tmp_path / "triton")]) == 0
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["model"] == "dmfnet-tiny" and meta["size_multiple"] == "4"
    names = [i.name for i in model.graph.input]
    assert names == ["mri", "other", "noise"] and [o.name for o in model.graph.output] == ["fused"]
    # H and W are symbolic (dynamic), the noise's timestep axis is fixed (tiny: 2 timesteps).
    dims = [d.dim_param or d.dim_value for d in model.graph.input[2].type.tensor_type.shape.dim]
    assert dims[:2] == [2, 2] and all(isinstance(d, str) for d in dims[2:])
    config = (tmp_path / "triton" / "dmfnet_tiny" / "config.pbtxt").read_text()
    assert (tmp_path / "triton" / "dmfnet_tiny" / "1" / "model.onnx").read_bytes() == out.read_bytes()
    for name in [*names, "fused"]:
        assert f'name: "{name}"' in config
    assert 'platform: "onnxruntime_onnx"' in config and "dims: [ 2, 2, -1, -1 ]" in config


@pytest.mark.slow
def test_fuse_cli_runtime_flag_matches_torch(tmp_path, monkeypatch):
    from models.images.imaging import decode_image, encode_png
    from tests.picture_compare import HUE_DEG, picture_differences

    monkeypatch.setenv("DMFNET_CACHE_DIR", str(tmp_path / "cache"))
    mri, pet = phantom_pair("pet", 80, 72, seed=2)
    (tmp_path / "m.png").write_bytes(encode_png(mri))
    (tmp_path / "p.png").write_bytes(encode_png(pet))
    outs = {}
    for runtime in ("torch", "onnxruntime"):
        o = tmp_path / f"{runtime}.png"
        assert main(["fuse", str(tmp_path / "m.png"), str(tmp_path / "p.png"), "-o", str(o),
                     "--weights", "random:fast", "--runtime", runtime]) == 0
        outs[runtime] = decode_image(o).pixels
    # One grey level of the model's luminance plus the 8-bit RGB's rounding; the same hue (tests/picture_compare.py)
    d = picture_differences(outs["torch"], outs["onnxruntime"])
    assert d["y_max"] <= 2.0 and d["y_mean"] < 0.3 and d["hue_max"] <= HUE_DEG, d
    assert list((tmp_path / "cache").glob("dmfnet-fast-*.onnx"))


def test_unknown_or_misplaced_runtime_is_refused(tmp_path, capsys):
    pipe = open_pipeline("random:fast", "cpu")
    with pytest.raises(RuntimeUnavailable, match="unknown runtime"):
        use_runtime(pipe, "tensorrt", tmp_path)
    assert use_runtime(pipe, "torch") is pipe and pipe.runtime == "torch"
    pipe.device = __import__("torch").device("cuda")  # refused before any export
    with pytest.raises(RuntimeUnavailable, match="use torch on cuda"):
        use_runtime(pipe, "onnxruntime", tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_export_is_atomic_and_cached(tmp_path):
    pipe = open_pipeline("random:fast", "cpu")
    first = exported_graph(pipe, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert exported_graph(pipe, tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


@pytest.mark.slow
def test_service_runs_on_onnxruntime(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from app.http.main import create_app
    from app.settings import ServiceSettings
    from models.images.imaging import encode_png

    monkeypatch.setenv("DMFNET_CACHE_DIR", str(tmp_path))
    settings = ServiceSettings(weights="random:fast", runtime="onnxruntime", warmup=False, max_wait_ms=1)
    mri, pet = phantom_pair("pet", 64, 64, seed=8)
    with TestClient(create_app(settings)) as client:
        assert client.get("/version").json()["model"]["runtime"] == "onnxruntime"
        r = client.post("/fuse", files={"mri": ("m.png", encode_png(mri)), "functional": ("p.png", encode_png(pet))})
        assert r.status_code == 200, r.text
    assert json.dumps(settings.model_dump())  # the setting is plain data (ConfigMap-able)
    assert Path(tmp_path).glob("*.onnx")


@pytest.mark.slow
def test_default_runtime_is_the_measured_best_and_falls_back_to_torch(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("DMFNET_RUNTIME", raising=False)
    assert default_runtime("cpu", "bf16") == "torch"  # torch bf16 measured faster (EPYC with AVX512-BF16)
    assert default_runtime("cpu", "fp32") == "onnxruntime" and default_runtime("cuda", "fp32") == "torch"
    assert use_runtime(open_pipeline("random:fast", "cpu", precision="bf16"), None, tmp_path).runtime == "torch"
    pipe = use_runtime(open_pipeline("random:fast", "cpu", precision="fp32"), None, tmp_path)
    assert pipe.runtime == "onnxruntime"
    # An automatic choice that cannot export never stops the tool: torch, with a warning.
    monkeypatch.setattr(runtimes, "exported_graph", lambda *a: (_ for _ in ()).throw(OSError("read-only cache")))
    pipe = use_runtime(open_pipeline("random:fast", "cpu", precision="fp32"), None, tmp_path)
    assert pipe.runtime == "torch" and "read-only cache" in caplog.text
    # Without ONNX Runtime installed the default is torch.
    real = runtimes.importlib.util.find_spec
    monkeypatch.setattr(runtimes.importlib.util, "find_spec", lambda m: None if m == "onnxruntime" else real(m))
    assert default_runtime("cpu") == "torch"
    # DMFNET_RUNTIME is the default when no flag is given; an explicit request that fails is an error.
    monkeypatch.setenv("DMFNET_RUNTIME", "openvino")
    with pytest.raises(OSError, match="read-only cache"):
        use_runtime(open_pipeline("random:fast", "cpu"), None, tmp_path)
