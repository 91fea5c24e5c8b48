"""Precision choice by hardware, and the benchmark scripts' smoke runs (numbers live in bench/, not here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.inference import hardware

pytestmark = pytest.mark.system  # real servers, tools or builds: see pyproject markers

ROOT = Path(__file__).resolve().parents[2]


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


def _last_json(script: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pipeline_bench_quick_runs():
    doc = _last_json("bench/pipeline.py", "--quick", "--weights", "random:tiny")
    assert doc["reference_pairs_per_s"] > 0 and doc["speedup"] > 0 and doc["config"] == "tiny"


def test_pipeline_bench_measures_the_fast_tier_next_to_the_full_model():
    doc = _last_json("bench/pipeline.py", "--quick", "--weights", "random:fast")
    assert doc["model"] == "dmfnet-fast" and doc["full_batched_pairs_per_s"] > 0
    assert doc["reference_pairs_per_s"] > 0 and 0 < doc["gflop_per_pair"] < 1  # 64 px


def test_runtimes_bench_quick_runs():
    doc = _last_json("bench/runtimes.py", "--quick")
    runtimes = {(r["tier"], r["runtime"]) for r in doc["rows"]}
    expected = {("dmfnet-fast", "openvino"), ("dmfnet-tiny", "onnxruntime"), ("dmfnet-fast", "onnxruntime-int8")}
    assert expected <= runtimes
    fp32 = [r for r in doc["rows"] if not r["runtime"].endswith("int8")]
    assert all(r["mad_vs_torch"] < 1 and r["pairs_per_s_64"] > 0 for r in fp32)


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "harvard").is_dir(), reason="needs ../shared/data")
def test_schedules_bench_measures_distinct_timesteps():
    doc = _last_json("bench/schedules.py", "similarity", "--per-task", "1")
    assert len(doc) == 15  # 5 scales x 3 timestep pairs
    assert all(0 < d["rel_l2"] < 0.1 and d["cos"] > 0.99 for d in doc.values())


def test_load_bench_quick_runs():
    doc = _last_json("bench/load.py", "--quick")
    runs = [r for per in doc["runs"].values() for r in per.values()]
    assert runs and all(r["errors"] == 0 and r["ok"] == r["requests"] for r in runs)
    assert len(doc["pipeline_timings"]) == len(runs) + 1 and set(doc["pipeline_timings"][0]) == {"1", "8"}
    assert all(r["of_pipeline"] > 0 and r["pipeline_pairs_per_s"] > 0 for r in runs)
    assert set(doc["runs"]) == {"no_batching", "batching_8", "batching_8_in_process"}
    assert doc["service_only"]["errors"] == 0 and doc["service_only"]["ok"] > 0
    split = doc["cpu_split"]  # server CPU counts the model process: a served pair costs at least the model's CPU
    assert split["model_cpu_ms"] > 0 and 0 < split["ceiling_of_pipeline"] <= 1
    assert all(r["server_cpu_ms_per_pair"] > 0 for r in runs)


def test_contention_bench_quick_runs():
    """Fusion beside a flood of cheap requests, model process and in-process: every fusion answered 200."""
    doc = _last_json("bench/contention.py", "--quick")
    assert set(doc["results"]) == {"model_process", "in_process"}
    for row in doc["results"].values():
        assert row["alone"]["fused_per_s"] > 0 and all(r["fuse_errors"] == 0 for r in row.values())
        assert row["healthz"]["flood_per_s"] > 0 and 0 < row["healthz"]["of_alone"]


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


def test_gpu_check_runs_reduced_on_cpu(tmp_path):
    """bench/gpu_check.sh on a machine without CUDA: says so, CUDA tests skip, last line JSON with cuda false."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path)}
    out = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["cuda"] is False and doc["ok"] and doc["cuda_tests"].get("skipped", 0) >= 5
    assert "CUDA tests are skipped" in out.stdout and (tmp_path / "device.json").exists()
    assert doc["pipeline_small"]["variants"] and doc["load"]["runs"]
    assert doc["study"]["tiers"]["fast"]["shell_s"]  # a study from the shell, timed


def test_gpu_wheels_fit_the_device_call(tmp_path):
    """The wheel folder for the bare GPU machine: everything it lacks, under the 64 MiB carried per call."""
    out = subprocess.run(["bash", "bench/gpu_wheels.sh", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr[-2000:]
    names = {p.name.split("-")[0].lower() for p in tmp_path.glob("*.whl")}
    for needed in ("fastapi", "uvicorn", "pydantic_settings", "python_multipart", "pydicom", "pynetdicom",
                   "dicomweb_client", "pywavelets", "pytest"):
        assert needed in names, needed
    assert "torch" not in names and sum(p.stat().st_size for p in tmp_path.iterdir()) < 64 * 2**20


def test_failover_bench_quick_loses_nothing():
    """3 replicas behind HAProxy: SIGTERM one and SIGKILL another mid-load; the balancer's retries lose none."""
    import shutil

    if shutil.which("haproxy") is None:
        pytest.skip("haproxy not installed (scripts/install-test-deps.sh installs it)")
    doc = _last_json("bench/failover.py", "--quick")
    assert doc["replicas"] >= 2 and doc["requests"] > 0 and doc["mixups"] == 0
    assert doc["phases"]["after_sigterm"]["failed"] == 0 and doc["phases"]["before"]["failed"] == 0, doc["phases"]
    assert doc["marked_down_after_s"]["sigterm"] is not None


def test_admission_bench_quick_keeps_memory_near_the_budget():
    """Two concurrent /fuse/batch calls whose pairs decode to 2.5x the budget: every pair fused (in line, no
    500), and the server grew by the budget plus the model's tiled working set (measured ~70 MB), no more."""
    doc = _last_json("bench/admission.py", "--quick")
    (run,) = doc["runs"]
    assert [c["status"] for c in run["calls"]] == [200, 200]
    assert all(s == 200 for c in run["calls"] for s in c["pairs"])
    assert run["growth_mb"] < run["budget_mb"] + 128
