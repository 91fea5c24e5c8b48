"""The push route's speed: studies pushed by dcmtk's storescu to ``dmfnet pacs listen``, fused and stored into a
real Orthanc.

* Latency: a 40-slice 256 px MR + 24-slice 128 px PET study (39 MR slices covered), time from storescu's last
  acknowledged instance to the derived series complete in Orthanc; ``stable_age_s`` is part of it by design and
  printed apart, so "after stable" is what the node adds. Fast and full tiers, each on its own node process.
* Receiving: instances/s spooled (fsync'd before each acknowledgement) on one association and on four at once.

    python bench/listen.py [--stable-age-s 2] [--tiers fast,full] [--instances 400]

Last line: one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.orthanc import OrthancServer  # noqa: E402
from harness.servers import free_port, wait_for_http  # noqa: E402
from harness.studies import new_study, series_from_volume, write_series_folder  # noqa: E402
from models.inference.hardware import describe_cpu  # noqa: E402
from models.volumes import phantom as pv  # noqa: E402

STORESCU = "/usr/bin/storescu"


def _node(tmp: Path, orthanc: OrthancServer, weights: str, stable_age_s: float) -> tuple[subprocess.Popen, int]:
    port, health = free_port(), free_port()
    env = {**os.environ, "DMFNET_PACS_TRANSPORT": "dicomweb", "DMFNET_PACS_DICOMWEB_URL": f"{orthanc.base}/dicom-web",
           "DMFNET_PACS_LISTEN_PORT": str(port), "DMFNET_PACS_LISTEN_HEALTH_PORT": str(health),
           "DMFNET_PACS_LISTEN_ALLOWED_AETS": '["PUSHER"]', "DMFNET_PACS_SPOOL_DIR": str(tmp / f"spool-{port}"),
           "DMFNET_PACS_CACHE_DIR": str(tmp / f"cache-{port}"), "DMFNET_PACS_STABLE_AGE_S": str(stable_age_s),
           "DMFNET_PACS_LISTEN_POLL_S": "0.1"}
    log = open(tmp / f"node-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dmfnet", "pacs", "--weights", weights, "--log-json", "listen"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if not wait_for_http(f"http://127.0.0.1:{health}/readyz", 180):
        proc.kill()
        raise RuntimeError((tmp / f"node-{port}.log").read_text()[-2000:])
    return proc, port


def _push(port: int, folder: Path) -> float:
    t0 = time.monotonic()
    subprocess.run([STORESCU, "-aet", "PUSHER", "-aec", "DMFNET", "+sd", "127.0.0.1", str(port), str(folder)],
                   check=True, capture_output=True)
    return time.monotonic() - t0


def _derived_count(orthanc: OrthancServer, study_uid: str) -> int:
    ids = httpx.post(f"{orthanc.base}/tools/lookup", content=study_uid).json()
    study = next((i["ID"] for i in ids if i["Type"] == "Study"), None)
    if study is None:
        return 0
    series = httpx.get(f"{orthanc.base}/studies/{study}/series").json()
    return sum(len(s["Instances"]) for s in series if s["MainDicomTags"].get("Modality") == "OT")


def latency(tmp: Path, orthanc: OrthancServer, weights: str, stable_age_s: float, seed: int) -> dict:
    """One study pushed to a fresh node of ``weights``: seconds from the last instance to the derived series."""
    mr_vol = pv.sample("MR", 256, 0.94, 40, 1.0, centre=[0, 0, 5])
    pet_vol = pv.sample("PT", 128, 2.6, 24, 2.03, centre=[10, -5, 0])
    proc, port = _node(tmp, orthanc, weights, stable_age_s)
    try:
        study = new_study(seed)
        folder = write_series_folder(tmp / f"study-{seed}", series_from_volume(study, mr_vol, 1),
                        series_from_volume(study, pet_vol, 2))
        push_s = _push(port, folder)
        last = time.monotonic()
        while _derived_count(orthanc, study.StudyInstanceUID) < 39:
            if time.monotonic() - last > 600:
                raise RuntimeError("no derived series after 600 s")
            time.sleep(0.05)
        total = time.monotonic() - last
    finally:
        proc.terminate()
        proc.wait(60)
    return {"weights": weights, "instances": 64, "push_s": round(push_s, 2), "last_instance_to_stored_s":
            round(total, 2), "stable_age_s": stable_age_s, "after_stable_s": round(total - stable_age_s, 2)}


def receiving(tmp: Path, orthanc: OrthancServer, instances: int, associations: int) -> dict:
    """Instances/s spooled by one node, from ``associations`` storescu processes at once (stable_age_s large, so
    no fusion runs meanwhile)."""
    proc, port = _node(tmp, orthanc, "random:tiny", 3600)
    try:
        per = instances // associations
        folders = []
        for a in range(associations):
            study = new_study(9000 + 10 * associations + a)
            folders.append(write_series_folder(tmp / f"recv-{associations}-{a}",
                                  series_from_volume(study, pv.sample("MR", 256, 0.94, per, 1.0), 1)))
        t0 = time.monotonic()
        pushers = [subprocess.Popen([STORESCU, "-aet", "PUSHER", "-aec", "DMFNET", "+sd", "127.0.0.1", str(port),
                                     str(f)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for f in folders]
        codes = [p.wait() for p in pushers]
        wall = time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(60)
    assert codes == [0] * associations, codes
    return {"associations": associations, "instances": per * associations, "seconds": round(wall, 2),
            "instances_per_s": round(per * associations / wall, 1), "bytes_per_instance": 256 * 256 * 2}


def main() -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stable-age-s", type=float, default=2.0)
    ap.add_argument("--tiers", default="fast,full")
    ap.add_argument("--instances", type=int, default=400)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        orthanc = OrthancServer(tmp / "orthanc")
        try:
            lat = [latency(tmp, orthanc, w, args.stable_age_s, 100 + n) for n, w in enumerate(args.tiers.split(","))]
            recv = [receiving(tmp, orthanc, args.instances, a) for a in (1, 4)]
        finally:
            orthanc.stop()
    print(f"CPU: {describe_cpu()}")
    print(f"{'tier':<6} {'push s':>7} {'last instance -> stored s':>26} {'of which stable_age_s':>22} "
          f"{'after stable s':>15}")
    for r in lat:
        print(f"{r['weights']:<6} {r['push_s']:>7} {r['last_instance_to_stored_s']:>26} {r['stable_age_s']:>22} "
              f"{r['after_stable_s']:>15}")
    print(f"{'associations':<13} {'instances':>10} {'seconds':>8} {'instances/s':>12}")
    for r in recv:
        print(f"{r['associations']:<13} {r['instances']:>10} {r['seconds']:>8} {r['instances_per_s']:>12}")
    print(json.dumps({"cpu": describe_cpu(), "latency": lat, "receiving": recv}))


if __name__ == "__main__":
    main()
