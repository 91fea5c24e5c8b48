"""The distilled fast tier: same pipeline code as DM-FNet (colour, determinism, tiling, errors), its weights
format, and selection by ``--weights fast`` in the CLI, the service and the PACS commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dmfnet.cli import main
from models.images.colour import rgb_to_ycbcr, split_luma
from models.images.imaging import encode_png
from models.images.pair_input import prepare_pair
from models.images.phantoms import phantom_inputs, phantom_pair
from models.inference.fast_pipeline import FastPipeline
from models.inference.pipeline import FusionPipeline
from models.inference.weights import (
    FAST_WEIGHTS,
    WeightsError,
    expected_checksum,
    load_weights,
    open_pipeline,
    save_fast_weights,
)
from models.nets.fast_net import FastConfig, FastFusionNet
from tests.conftest import decoded

SHIPPED_FAST = FAST_WEIGHTS.exists()


@pytest.fixture(scope="module")
def fast() -> FastPipeline:
    return FastPipeline.random_init(seed=1)


def test_fast_pipeline_keeps_the_functional_colour_and_the_size(fast):
    mri, pet = phantom_pair("pet", 72, 90, seed=3)
    out = fast.fuse([prepare_pair(decoded(mri), decoded(pet))])[0]
    assert out.pixels.shape == (72, 90, 3) and out.modality == "pet"
    # Fused on Y only: where RGB was not clipped, the output's Cb/Cr are the PET's.
    _, chroma = split_luma(decoded(pet))
    inside = np.all((out.pixels > 0.001) & (out.pixels < 0.999), axis=-1)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(rgb_to_ycbcr(out.pixels)[..., 1:][inside], chroma[inside], atol=1e-4)
    ct = fast.fuse([prepare_pair(*map(decoded, phantom_pair("ct", 64, 64, seed=4)))])[0]
    assert ct.pixels.ndim == 2


def test_fast_pipeline_is_deterministic_and_batch_independent(fast):
    a, b = phantom_inputs(1, 64, "pet")[0], phantom_inputs(1, 64, "ct")[0]
    alone = fast.fuse([a])[0].pixels
    assert np.array_equal(alone, fast.fuse([a])[0].pixels)
    batched = fast.fuse([b, a, b, a, a])
    # One pair per network call on CPU: the same bytes whatever the batch-mates (not merely close).
    assert fast.pairs_per_call == 1
    assert np.array_equal(batched[1].pixels, alone) and np.array_equal(batched[4].pixels, alone)
    mixed = fast.fuse([*phantom_inputs(3, 80, "pet"), a, *phantom_inputs(2, 48, "ct")])
    assert np.array_equal(mixed[3].pixels, alone)


def test_fast_pipeline_tiles_large_images_with_the_shared_code(fast, monkeypatch):
    calls = []
    original = FastPipeline._fuse_tiled

    def spy(self, pair, wanted):
        calls.append(pair.size)
        return original(self, pair, wanted)

    monkeypatch.setattr(FastPipeline, "_fuse_tiled", spy)
    pair = phantom_inputs(1, 300, "pet")[0]
    out = fast.fuse([pair])[0].pixels
    assert calls == [(300, 300)] and out.shape == (300, 300, 3) and np.isfinite(out).all()
    # Cancellation works the same way: a pair nobody wants any more is dropped.
    assert fast.fuse([pair], alive=lambda i: False) == [None]


def test_fast_network_starts_as_the_average_and_pads_to_its_multiple():
    net = FastFusionNet(FastConfig(widths=(8, 8, 8), blocks=(1, 1, 1))).eval()
    a, b = torch.rand(2, 1, 32, 40), torch.rand(2, 1, 32, 40)
    assert torch.allclose(net(a, b), (a + b) / 2, atol=1e-6)  # zero-initialised output layer
    pipe = FastPipeline(net.cfg, net)
    odd = phantom_inputs(1, 60, "ct")[0]  # 60 is no multiple of 8: padded and cropped back
    assert pipe.fuse([odd])[0].pixels.shape == (60, 60)


def test_fast_weights_round_trip_and_format_errors(tmp_path):
    cfg = FastConfig(widths=(8, 8, 8), blocks=(1, 1, 1))
    net = FastFusionNet(cfg)
    path = tmp_path / "f.pt"
    sha = save_fast_weights(path, cfg, net, {"steps": 3})
    pipe = open_pipeline(str(path), "cpu")
    assert isinstance(pipe, FastPipeline) and pipe.weights_sha256 == sha and pipe.model_name == "dmfnet-fast"
    with pytest.raises(WeightsError, match="dmfnet-weights/1"):
        load_weights(path)  # a fast file is not a DM-FNet file
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightsError, match="could not be read"):
        open_pipeline(str(path), "cpu")


def test_model_name_is_in_provenance_and_describe(fast, tiny_pipeline):
    assert fast.provenance()["Software"].endswith("(dmfnet-fast)")
    assert tiny_pipeline.provenance()["Software"].endswith("(dmfnet-tiny)")
    assert fast.describe()["model"] == "dmfnet-fast" and fast.describe()["runtime"] == "torch"


@pytest.mark.skipif(not SHIPPED_FAST, reason="weights/dmfnet_fast.pt not shipped yet")
def test_shipped_fast_weights_are_verified_and_selected_by_name(tmp_path, capsys):
    assert expected_checksum(FAST_WEIGHTS) is not None
    pipe = open_pipeline("fast", "cpu")
    assert isinstance(pipe, FastPipeline) and not pipe.is_random
    assert isinstance(open_pipeline("full", "cpu"), FusionPipeline)
    mri, pet = phantom_pair("pet", 64, 64, seed=5)
    (tmp_path / "m.png").write_bytes(encode_png(mri))
    (tmp_path / "p.png").write_bytes(encode_png(pet))
    assert main(["fuse", str(tmp_path / "m.png"), str(tmp_path / "p.png"), "-o", str(tmp_path / "o.png"),
                 "--weights", "fast"]) == 0
    text = Image.open(tmp_path / "o.png").text
    assert "dmfnet-fast" in text["Software"] and pipe.weights_sha256 in text["Source"]
    capsys.readouterr()
    assert main(["info", "--weights", "fast"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "dmfnet-fast" and info["weights_sha256"] == pipe.weights_sha256


def test_service_reports_the_fast_model(fast):
    from fastapi.testclient import TestClient

    from app.http.main import create_app
    from app.settings import ServiceSettings

    app = create_app(ServiceSettings(warmup=False, max_wait_ms=1), pipeline=fast)
    mri, pet = phantom_pair("pet", 64, 64, seed=6)
    with TestClient(app) as client:
        assert client.get("/version").json()["model"]["model"] == "dmfnet-fast"
        r = client.post("/fuse", files={"mri": ("m.png", encode_png(mri)), "functional": ("p.png", encode_png(pet))})
        assert r.status_code == 200 and r.headers["X-Model-Version"].endswith("dmfnet-fast")
        assert "dmfnet-fast" in Image.open(__import__("io").BytesIO(r.content)).text["Software"]
        assert 'model="dmfnet-fast"' in client.get("/metrics").text


def test_pacs_in_process_fuser_names_the_fast_model(fast):
    from app.pacs.workflow import InProcessFuser

    fuser = InProcessFuser(fast)
    mri, pet = phantom_pair("pet", 32, 32, seed=7)
    out = fuser.fuse([mri], [pet], "pet")
    assert fuser.model_name == "dmfnet-fast" and out[0].shape == (32, 32, 3)
