"""Precision choice by hardware, and the benchmark scripts' smoke runs (numbers live in bench/, not here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import hardware

ROOT = Path(__file__).resolve().parent.parent


def test_auto_precision_follows_cpu_flags(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert hardware.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert hardware.resolve_precision("auto", "cpu") == "bf16"
    assert hardware.resolve_precision("fp32", "cpu") == "fp32"  # explicit choices are kept
    with pytest.raises(ValueError, match="precision"):
        hardware.resolve_precision("fp16", "cpu")


def test_channels_last_defaults_to_bf16_only():
    assert hardware.resolve_channels_last(None, "bf16") is True
    assert hardware.resolve_channels_last(None, "fp32") is False
    assert hardware.resolve_channels_last(True, "fp32") is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_pipeline_matches_cpu_fp32():
    from models.phantoms import phantom_pair
    from models.pipeline import FusionPipeline, prepare_pair
    from tests.conftest import decoded

    m, f = phantom_pair("pet", 64, 64, seed=2)
    pair = prepare_pair(decoded(m), decoded(f), "pet")
    cpu = FusionPipeline.random_init("tiny", precision="fp32").fuse([pair])[0].pixels
    gpu = FusionPipeline.random_init("tiny", device="cuda", precision="fp32").fuse([pair])[0].pixels
    assert abs(cpu - gpu).max() < 1e-3


def _last_json(script: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pipeline_bench_quick_runs():
    doc = _last_json("bench/pipeline.py", "--quick", "--weights", "random:tiny")
    assert doc["reference_pairs_per_s"] > 0 and doc["speedup"] > 0 and doc["config"] == "tiny"


def test_load_bench_quick_runs():
    doc = _last_json("bench/load.py", "--quick")
    runs = [r for per in doc["runs"].values() for r in per.values()]
    assert runs and all(r["errors"] == 0 and r["ok"] == r["requests"] for r in runs)
    assert len(doc["pipeline_timings"]) == len(runs) + 1 and set(doc["pipeline_timings"][0]) == {"1", "8"}
    assert all(r["of_pipeline"] > 0 and r["pipeline_pairs_per_s"] > 0 for r in runs)


def test_sizes_bench_quick_runs():
    doc = _last_json("bench/sizes.py", "--quick")
    rows = doc["rows"]
    assert {r["size"] for r in rows} == {64, 128, 256} and all("seconds" in r for r in rows)
    assert all(r["shape"][:2] == [r["size"], r["size"]] for r in rows)
    tiled_and_untiled = [r for r in rows if "mad_8bit" in r]
    assert tiled_and_untiled and all(r["mad_8bit"] < 20 for r in tiled_and_untiled)


def test_soak_bench_quick_passes():
    """Hostile mix against a real server: no unexpected status, no 5xx, no mix-ups, shipped weights identical."""
    doc = _last_json("bench/soak.py", "--quick")
    assert doc["passed"] and doc["requests"] > 0 and doc["mixups"] == 0 and doc["unexpected_5xx"] == 0
    assert doc["correctness"]["identical"] == doc["correctness"]["pairs"] > 0
