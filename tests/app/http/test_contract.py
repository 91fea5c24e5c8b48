"""The OpenAPI contract, checked by a third-party client: schemathesis against a real ``dmfnet serve``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.http.main import create_app
from app.settings import ServiceSettings
from tests.app.http.test_server_guards import serving

pytestmark = pytest.mark.system  # real servers, tools or builds: see pyproject markers

CONFIG = Path(__file__).resolve().parents[2] / "contract" / "schemathesis.toml"


def _schemathesis() -> str:
    found = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    if not Path(found).exists():
        pytest.fail("schemathesis is not installed (pip install -e '.[test]')")
    return found


def test_schemathesis_finds_no_failures():
    """Every generated request (schema-valid and schema-violating) against the live service: 0 failures."""
    with serving("--no-warmup") as (_, base, _log):
        run = subprocess.run([_schemathesis(), "--config-file", str(CONFIG), "run", f"{base}/openapi.json",
                              "--max-examples", "100", "--seed", "26", "--no-color"],
                             capture_output=True, text=True, timeout=600, cwd=CONFIG.parent)
    summary = "\n".join(run.stdout.splitlines()[-30:])
    assert run.returncode == 0, summary
    assert " passed" in summary and "failure" not in summary.split("Test cases:")[-1]


def test_schema_says_what_the_service_accepts(tiny_pipeline):
    """The three mismatches schemathesis once found, pinned: no JSON null offered for multipart fields, batch
    file lists need an item, base64 strings cannot be empty."""
    with TestClient(create_app(ServiceSettings(warmup=False), tiny_pipeline)) as c:
        schemas = c.get("/openapi.json").json()["components"]["schemas"]
    fuse, batch, js = schemas["Body_fuse_fuse_post"], schemas["Body_fuse_batch_fuse_batch_post"], schemas["FuseJson"]
    for body in (fuse, batch):
        assert "anyOf" not in body["properties"]["modality"] and "null" not in str(body["properties"]["modality"])
        assert body["properties"]["resize"]["type"] == "boolean"
    assert batch["properties"]["mri"]["minItems"] == 1 and batch["properties"]["functional"]["minItems"] == 1
    assert js["properties"]["mri"]["minLength"] == 1 and js["properties"]["functional"]["minLength"] == 1


def test_form_values_are_words_not_guesses(tiny_pipeline):
    from tests.app.engine.test_admission import _files, _pair

    with TestClient(create_app(ServiceSettings(warmup=False), tiny_pipeline)) as c:
        files = _files(*_pair(64))
        assert c.post("/fuse", files=files, data={"resize": "0"}).status_code == 422
        assert c.post("/fuse", files=files, data={"modality": ""}).json()["error"] == "empty_field"
        assert c.post("/fuse", files=files, data={"resize": "True"}).status_code == 200
