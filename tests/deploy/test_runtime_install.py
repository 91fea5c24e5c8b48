"""The README's first command installs the runtime only, and everything a user runs works with just that.

Builds a fresh virtual environment with ``scripts/setup.sh`` (no ``--test``), checks that no test tool came
with it, runs every CLI entry point's ``--help``, ``dmfnet pacs echo`` against a real Orthanc over both
transports, and ``dmfnet serve`` itself (a fusion, then SIGTERM). Slow (a torch install from the local wheel
cache, ~1 min); it is what CI needs to notice a runtime module importing a test-only package (httpx was one).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.system  # real servers, tools or builds: see pyproject markers

ENTRY_POINTS = [[], ["serve"], ["fuse"], ["info"], ["eval"], ["sample"], ["export"], ["train"], ["pacs"],
                ["pacs", "echo"], ["pacs", "fuse-study"], ["pacs", "watch"], ["pacs", "listen"]]


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory):
    venv = tmp_path_factory.mktemp("runtime") / "venv"
    out = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, env={**os.environ, "VENV": str(venv)},
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    return venv


def test_runtime_install_has_no_test_tools(runtime_venv):
    for test_only in ("pytest", "ruff"):
        r = subprocess.run([runtime_venv / "bin/python", "-c", f"import {test_only}"], capture_output=True)
        assert r.returncode != 0, f"{test_only} is installed by the runtime-only setup"


@pytest.mark.parametrize("args", ENTRY_POINTS, ids=lambda a: " ".join(a) or "dmfnet")
def test_every_entry_point_starts(runtime_venv, args):
    r = subprocess.run([runtime_venv / "bin/dmfnet", *args, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]


def test_fast_tier_runs_on_both_installed_runtimes_and_optional_ones_fail_clearly(runtime_venv, tmp_path):
    dmfnet = runtime_venv / "bin/dmfnet"
    subprocess.run([dmfnet, "sample", str(tmp_path), "--size", "64"], check=True, capture_output=True, timeout=120)
    pair = [str(tmp_path / "sample_pet_mri.png"), str(tmp_path / "sample_pet_pet.png")]
    ok = subprocess.run([dmfnet, "fuse", *pair, "-o", str(tmp_path / "f.png"), "--weights", "fast"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and (tmp_path / "f.png").exists(), ok.stderr[-2000:]
    # ONNX Runtime comes with the runtime install and runs the shipped graphs: no export tools, no export.
    env = {**os.environ, "DMFNET_CACHE_DIR": str(tmp_path / "cache")}
    for weights in ("fast", "full"):
        r = subprocess.run([dmfnet, "fuse", *pair, "-o", str(tmp_path / f"{weights}.png"), "--weights", weights,
                            "--runtime", "onnxruntime"], capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0 and (tmp_path / f"{weights}.png").exists(), r.stderr[-2000:]
    assert not (tmp_path / "cache").exists()
    # OpenVINO is an optional extra: asking for it without it is a one-line error, not a traceback.
    r = subprocess.run([dmfnet, "fuse", *pair, "-o", str(tmp_path / "g.png"), "--runtime", "openvino"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "[runtimes]" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("transport", ["dicomweb", "dimse"])
def test_pacs_echo_on_the_runtime_install(runtime_venv, orthanc, transport):
    env = {**os.environ, "DMFNET_PACS_DICOMWEB_URL": f"{orthanc['base']}/dicom-web",
           "DMFNET_PACS_PORT": str(orthanc["dicom"])}
    r = subprocess.run([runtime_venv / "bin/dmfnet", "pacs", "--transport", transport, "echo"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "PACS answered" in r.stdout, r.stderr[-2000:]


def test_volumes_on_the_runtime_install(runtime_venv, orthanc, tmp_path):
    """NIfTI in and out, and a PACS study on different grids, with nothing but the runtime install."""
    subprocess.run([runtime_venv / "bin/dmfnet", "sample", "--volumes", str(tmp_path)], check=True, timeout=120,
                   capture_output=True)
    r = subprocess.run([runtime_venv / "bin/dmfnet", "fuse", str(tmp_path / "t1.nii.gz"), str(tmp_path / "pet.nii.gz"),
                        "--modality", "pet", "-o", str(tmp_path / "fused.nii.gz"), "--weights", "fast"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and (tmp_path / "fused.json").exists(), r.stderr[-2000:]
    r = subprocess.run([runtime_venv / "bin/dmfnet", "fuse", str(tmp_path / "t1.nii.gz"), str(tmp_path / "pet.nii.gz"),
                        "--modality", "pet", "-o", str(tmp_path / "reg.nii.gz"), "--weights", "fast", "--register",
                        "rigid"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "rigid registration (PT to MR" in r.stderr, r.stderr[-2000:]
    from harness.orthanc import upload_study
    from harness.studies import new_study, series_from_volume
    from models.volumes import phantom as pv

    study = new_study(200)
    mr = series_from_volume(study, pv.sample("MR", 64, 3.0, 20, 3.0), 1)
    pet = series_from_volume(study, pv.sample("PT", 32, 6.0, 8, 6.0, centre=[4, 0, 0]), 2)
    upload_study(orthanc, {"MR": mr, "PT": pet})
    env = {**os.environ, "DMFNET_PACS_DICOMWEB_URL": f"{orthanc['base']}/dicom-web",
           "DMFNET_PACS_PORT": str(orthanc["dicom"]), "XDG_CACHE_HOME": str(tmp_path)}
    for transport in ("dicomweb", "dimse"):
        r = subprocess.run([runtime_venv / "bin/dmfnet", "pacs", "--transport", transport, "--weights", "fast",
                            "fuse-study", "--study", study.StudyInstanceUID, "--mri-series", mr[0].SeriesInstanceUID,
                            "--functional-series", pet[0].SeriesInstanceUID], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and '"status": "' + ("stored" if transport == "dicomweb" else "exists") in r.stdout, (
            r.stdout[-1000:], r.stderr[-2000:])


def test_the_service_serves_and_drains_on_the_runtime_install(runtime_venv, tmp_path):
    """`dmfnet serve` itself (uvicorn with the guarded protocol and the draining shutdown) from the runtime-only
    install: ready, a fusion, then SIGTERM and a clean exit."""
    import signal

    import numpy as np

    from harness.servers import free_port, wait_for_http
    from models.images.colour import hot_colormap
    from models.images.imaging import encode_png

    port = free_port()
    proc = subprocess.Popen([runtime_venv / "bin/dmfnet", "serve", "--weights", "random:tiny", "--port", str(port),
                             "--no-warmup"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout_s=120)
        yy, xx = np.mgrid[0:64, 0:64].astype(np.float32) / 64
        (tmp_path / "m.png").write_bytes(encode_png((xx + yy) / 2))
        (tmp_path / "f.png").write_bytes(encode_png(hot_colormap(xx)))
        out = subprocess.run([runtime_venv / "bin/python", "-c", (
            "import sys, urllib.request, uuid\n"
            "m, f = open(sys.argv[1], 'rb').read(), open(sys.argv[2], 'rb').read()\n"
            "b = uuid.uuid4().hex\n"
            "body = b''.join(b'--' + b.encode() + b'\\r\\nContent-Disposition: form-data; name=\"' + n + "
            "b'\"; filename=\"x.png\"\\r\\n\\r\\n' + d + b'\\r\\n' for n, d in ((b'mri', m), (b'functional', f)))"
            " + b'--' + b.encode() + b'--\\r\\n'\n"
            "req = urllib.request.Request(sys.argv[3], body, {'Content-Type': 'multipart/form-data; boundary=' + b})\n"
            "r = urllib.request.urlopen(req, timeout=60)\n"
            "print(r.status, r.headers['content-type'])\n"),
            tmp_path / "m.png", tmp_path / "f.png",
            f"http://127.0.0.1:{port}/fuse"], capture_output=True, text=True, timeout=120)
        assert out.stdout.split() == ["200", "image/png"], out.stderr[-2000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "drained" in proc.stderr.read()

