"""Shared fixtures: phantom pairs generated once per session, a tiny random pipeline."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from harness.orthanc import ORTHANC, ORTHANC_DICOMWEB, OrthancServer
from models.images.imaging import DecodedImage, encode_png
from models.images.phantoms import phantom_pair
from models.inference.pipeline import FusionPipeline

# The CLI and the service pick ONNX Runtime on a CPU when it is installed (it is, for the tests); the tests
# run torch unless they ask for a runtime, so that not every CLI call and server start exports a graph.
# tests/models/inference/test_runtimes.py covers the automatic choice.
os.environ.setdefault("DMFNET_RUNTIME", "torch")


@pytest.fixture(scope="session")
def tiny_pipeline() -> FusionPipeline:
    """Random-initialised tiny model (speed: tests exercise plumbing, not image quality)."""
    return FusionPipeline.random_init("tiny", seed=0)


@pytest.fixture(scope="session")
def pet_pair() -> tuple[np.ndarray, np.ndarray]:
    """(MRI gray, PET RGB) phantoms of an odd size."""
    return phantom_pair("pet", 72, 90, seed=3)


@pytest.fixture(scope="session")
def ct_pair() -> tuple[np.ndarray, np.ndarray]:
    """(MRI gray, CT gray) phantoms."""
    return phantom_pair("ct", 64, 64, seed=4)


@pytest.fixture(scope="session")
def pair_dir(tmp_path_factory) -> object:
    """A directory laid out like ../shared/data/harvard with phantom pairs of three tasks."""
    root = tmp_path_factory.mktemp("pairs")
    for modality, seeds in (("ct", (1, 2)), ("pet", (3, 4)), ("spect", (5,))):
        d = root / f"MRI-{modality.upper()}"
        d.mkdir()
        for s in seeds:
            m, f = phantom_pair(modality, 64, 64, seed=s)
            (d / f"{s}001_mri.png").write_bytes(encode_png(m))
            (d / f"{s}001_{modality}.png").write_bytes(encode_png(f))
    return root


def decoded(pixels: np.ndarray, bits: int = 8) -> DecodedImage:
    """Wrap an array as a decoded image."""
    return DecodedImage(pixels.astype(np.float32), bits)


ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- a real PACS
def need_orthanc() -> None:
    """Skip unless Orthanc with the DICOMweb plugin is installed."""
    if ORTHANC is None or not ORTHANC_DICOMWEB.exists():
        pytest.skip("Orthanc with the DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb; "
                    ".ci/run does this)")


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real Orthanc shared by the session's PACS tests."""
    need_orthanc()
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    yield server.info()
    server.stop()


class RecordingPipeline:
    """Wraps a real pipeline: records batch sizes and threads, can be slowed down or told to fail on a marked
    pair; everything else (config, provenance, description) is the wrapped pipeline's."""

    def __init__(self, inner: FusionPipeline, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.batches: list[int] = []
        self.poison: set[int] = set()  # id() of pairs that make fuse() raise
        self.started = threading.Event()
        self.threads: list[str] = []  # thread that ran each batch

    def fuse(self, pairs, alive=None):
        self.started.set()
        self.threads.append(threading.current_thread().name)
        self.batches.append(len(pairs))
        time.sleep(self.delay_s)
        if any(id(p) in self.poison for p in pairs):
            raise RuntimeError("simulated model failure")
        return self.inner.fuse(pairs, alive)

    def __getattr__(self, name):
        return getattr(self.inner, name)
