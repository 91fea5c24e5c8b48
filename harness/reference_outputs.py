"""The fused phantoms whose recorded outputs tests/models/inference/test_outputs_unchanged.py compares against,
and how they are made (scripts/record_reference_outputs.py records them): tiny random model and both shipped
tiers, 8-bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np

THREADS = 2
CASES = [["tiny", "ct", 64], ["tiny", "pet", 72], ["tiny", "pet", 300], ["shipped", "ct", 64],
         ["shipped", "pet", 96], ["fast", "pet", 96], ["fast", "ct", 300]]


def cpu_signature() -> str:
    """The instruction-set flags that pick different float kernels (AVX2 / AVX-512 / AMX)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def fused_cases(pipes: dict) -> dict[str, np.ndarray]:
    """8-bit fused outputs of every case (the 300 px case goes through the tiled path of a 256 px tile)."""
    from models.images.phantoms import phantom_inputs

    out = {}
    for model, modality, size in CASES:
        pair = phantom_inputs(1, size, modality)
        out[f"{model}_{modality}_{size}"] = np.round(pipes[model].fuse(pair)[0].pixels * 255).astype(np.uint8)
    return out


def reference_pipelines() -> dict:
    """The recorded models: tiny random DM-FNet, the shipped DM-FNet and the shipped fast tier (torch)."""
    from models.inference.pipeline import FusionPipeline
    from models.inference.weights import open_pipeline

    return {"tiny": FusionPipeline.random_init("tiny", seed=0), "shipped": open_pipeline("full", "cpu"),
            "fast": open_pipeline("fast", "cpu")}
