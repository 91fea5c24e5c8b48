"""The CUDA path (``pytest -m cuda``): skipped cleanly without a GPU; run by ``bench/gpu_check.sh`` on a lent one.

Bounds, in luminance grey levels with the same hue (tests/picture_compare.py): CUDA fp32 vs CPU fp32 within 2
(different kernels, same maths); bf16 vs fp32 on CUDA within 1 on average; bit-identical reruns and batch
compositions on one device; tiled 4096x4096 under a stated GPU memory bound; the service on CUDA answering /fuse.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.images.phantoms import phantom_inputs
from models.inference.pipeline import FusionPipeline
from tests.picture_compare import HUE_DEG, picture_differences

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]

TILED_4096_GPU_BOUND_GB = 4.0  # the small model's tiles + 4096^2 buffers; the untiled attention asked for TBs


def test_cuda_fp32_matches_cpu_fp32():
    cpu = FusionPipeline.random_init("small", seed=0, precision="fp32")
    gpu = FusionPipeline.random_init("small", seed=0, device="cuda", precision="fp32")
    for pair in phantom_inputs(2, 128, "pet") + phantom_inputs(1, 96, "ct"):
        d = picture_differences(cpu.fuse([pair])[0].pixels, gpu.fuse([pair])[0].pixels)
        assert d["y_max"] <= 2.0 and d["hue_max"] <= HUE_DEG, d


def test_cuda_bf16_close_to_fp32():
    fp = FusionPipeline.random_init("small", seed=0, device="cuda", precision="fp32")
    bf = FusionPipeline.random_init("small", seed=0, device="cuda", precision="bf16")
    pairs = phantom_inputs(2, 128, "pet")
    for p in pairs:
        d = picture_differences(fp.fuse([p])[0].pixels, bf.fuse([p])[0].pixels)
        assert d["y_mean"] <= 1.0 and d["hue_max"] <= HUE_DEG, d


def test_cuda_is_deterministic_across_runs_and_batches():
    torch.backends.cudnn.benchmark = False
    gpu = FusionPipeline.random_init("small", seed=0, device="cuda")
    pairs = phantom_inputs(3, 128, "pet")
    alone = [gpu.fuse([p])[0].pixels for p in pairs]
    again = [gpu.fuse([p])[0].pixels for p in pairs]
    batched = [r.pixels for r in gpu.fuse(pairs[::-1])][::-1]
    for a, b, c in zip(alone, again, batched, strict=True):
        assert np.array_equal(a, b)
        d = picture_differences(a, c)  # batch composition: different kernel shapes, same maths
        assert d["y_max"] <= 1.0 and d["hue_max"] <= HUE_DEG, d


def test_cuda_tiled_4096_within_memory_bound():
    gpu = FusionPipeline.random_init("small", seed=0, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    out = gpu.fuse(phantom_inputs(1, 4096, "pet"))[0].pixels
    peak_gb = torch.cuda.max_memory_allocated() / 2**30
    assert out.shape == (4096, 4096, 3) and np.isfinite(out).all()
    assert peak_gb < TILED_4096_GPU_BOUND_GB, peak_gb


def test_service_on_cuda_answers_fuse():
    from fastapi.testclient import TestClient

    from app.http.main import create_app
    from app.settings import ServiceSettings
    from models.images.imaging import encode_png
    from models.images.phantoms import phantom_pair

    settings = ServiceSettings(weights="random:small", device="cuda", warmup=True, max_wait_ms=5)
    m, f = phantom_pair("pet", 256, 256, seed=1)
    with TestClient(create_app(settings)) as c:
        assert c.get("/version").json()["model"]["device"].startswith("cuda")
        r = c.post("/fuse", files={"mri": ("m.png", encode_png(m)), "functional": ("f.png", encode_png(f))})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
