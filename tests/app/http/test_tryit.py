"""The try-it page: served by the service itself, no external assets, and driven in a real browser (Debian's
Chromium through Selenium and chromedriver) against a real `dmfnet serve` process."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.http.main import create_app
from app.settings import ServiceSettings
from harness.servers import free_port, wait_for_http
from tests.conftest import ROOT

pytestmark = pytest.mark.system  # real servers, tools or builds: see pyproject markers

KEY = "try-it-page-key-0123456789"


def test_page_and_samples_are_served_without_external_assets(tiny_pipeline):
    app = create_app(ServiceSettings(warmup=False, api_key=KEY), tiny_pipeline)
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert not re.search(r"(src|href)=\"https?://", page.text) and "not for primary diagnosis" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        png = client.get("/samples/pet/functional.png")  # the page and its samples need no key ...
        assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (256, 256)
        assert client.get("/samples/xray/mri.png").status_code == 404
        assert client.post("/fuse").status_code == 401  # ... fusing does, as for any client
        assert "/" not in client.get("/openapi.json").json()["paths"]  # a page, not part of the API contract


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (the test extra has it)")
    if not (chromium and driver):
        pytest.skip("chromium and chromedriver not installed (scripts/install-test-deps.sh installs them)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver), options=options)
    yield b
    b.quit()


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "DMFNET_API_KEY": KEY, "DMFNET_RUNTIME": "torch"}
    proc = subprocess.Popen([sys.executable, "-m", "dmfnet", "serve", "--weights", "fast,full", "--port", str(port)],
                            cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    assert wait_for_http(f"{base}/readyz", timeout_s=300)
    yield base
    proc.terminate()
    proc.wait(30)


PIXELS = """
const img = document.getElementById(arguments[0]);
const c = document.createElement("canvas");
c.width = img.naturalWidth; c.height = img.naturalHeight;
const g = c.getContext("2d"); g.drawImage(img, 0, 0);
return Array.from(g.getImageData(0, 0, c.width, c.height).data);
"""


def test_a_phantom_pair_fuses_in_a_real_browser(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    browser.find_element(By.ID, "api-key").send_keys(KEY)
    browser.find_element(By.ID, "use-sample").click()
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.execute_script("return document.getElementById('functional-view').naturalWidth") > 0)
    browser.find_element(By.ID, "fuse").click()
    wait.until(lambda b: b.execute_script("return document.getElementById('fused').naturalWidth") > 0)
    got = np.array(browser.execute_script(PIXELS, "fused"), np.uint8).reshape(256, 256, 4)[..., :3]
    # the same pair through the API: the page shows exactly the service's fusion, not a placeholder
    samples = [httpx.get(f"{server}/samples/pet/{r}.png").content for r in ("mri", "functional")]
    direct = httpx.post(f"{server}/fuse", files={"mri": ("m.png", samples[0]), "functional": ("f.png", samples[1])},
                        data={"modality": "pet"}, headers={"X-API-Key": KEY}, timeout=60)
    want = np.array(Image.open(io.BytesIO(direct.content)).convert("RGB"))
    assert got.std() > 10 and np.abs(got.astype(int) - want).max() <= 1
    headers = browser.find_element(By.ID, "headers").text
    from models.inference.manifest import expected_checksum
    from models.inference.weights import FAST_WEIGHTS

    assert re.search(r"X-Model-Version .*dmfnet-fast", headers)
    assert f"X-Weights-SHA256 {expected_checksum(FAST_WEIGHTS)}" in headers
    assert "dmfnet-fast" in browser.find_element(By.ID, "served").text
    # the other tier, picked on the page
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "tier")).select_by_value("full")
    before = browser.execute_script("return document.getElementById('fused').src")
    browser.find_element(By.ID, "fuse").click()
    wait.until(lambda b: b.execute_script("return document.getElementById('fused').src") != before
               and b.execute_script("return document.getElementById('fused').naturalWidth") > 0)
    assert re.search(r"X-Model-Version .*dmfnet-small", browser.find_element(By.ID, "headers").text)
    # a file that is no image: the page shows the service's JSON error
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    browser.find_element(By.ID, "mri").send_keys(str(bad))
    browser.find_element(By.ID, "fuse").click()
    wait.until(lambda b: b.find_element(By.ID, "error").text)
    error = browser.find_element(By.ID, "error").text
    assert "HTTP 4" in error and ('"error"' in error) and ("not_an_image" in error or "corrupt_image" in error)
