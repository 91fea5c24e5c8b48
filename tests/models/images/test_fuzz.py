"""The fuzzers' seeds and findings replayed as regression cases, and a short seeded fuzz run (bench/fuzz.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.png_craft import fuzz_module

ROOT = Path(__file__).resolve().parents[3]
FUZZ = ROOT / "tests" / "fuzz"


fuzz = fuzz_module()
CASES = sorted((target, path) for target in fuzz.TARGETS for kind in ("seeds", "findings")
               for path in (FUZZ / kind / target).glob("*") if path.is_file())


def test_every_target_has_seeds():
    assert {t for t, p in CASES if "seeds" in p.parts} == set(fuzz.TARGETS)


@pytest.mark.parametrize(("target", "path"), CASES, ids=[f"{t}/{p.parent.parent.name}/{p.name}" for t, p in CASES])
def test_seeds_and_findings_replay_without_a_finding(target, path):
    """Each kept input gives a clean result or a clean refusal (a finding fixed stays fixed)."""
    fuzz.CHECKS[target](path.read_bytes())


def test_the_kept_dicom_findings_are_refused_with_a_reason():
    from models.volumes.io import DicomReadError, read_dicom_bytes
    from models.volumes.volume import GeometryError

    for path in sorted((FUZZ / "findings" / "dicom").glob("*")):
        with pytest.raises((GeometryError, DicomReadError)):
            read_dicom_bytes([path.read_bytes()])


@pytest.mark.slow
@pytest.mark.parametrize("target", ["png", "dicom"])
def test_a_short_seeded_fuzz_run_finds_nothing(target, tmp_path):
    pytest.importorskip("atheris")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fuzz.py"), target, "--seconds", "8", "--seed", "7"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    result = json.loads(proc.stdout.strip().splitlines()[-1])[0]
    assert result["executions"] > 100, proc.stderr[-2000:]
    assert proc.returncode == 0 and not result["findings"], proc.stdout
