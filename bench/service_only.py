"""``dmfnet serve`` with a model that does no work: the service's own cost, measured apart from the model's.

Same flags as ``dmfnet serve``; the real pipeline is loaded and warmed up as usual (so every header, limit and
provenance chunk is the real one; in the model process too), but each pair's "fused" luminance is its MRI
luminance, returned at once.
Everything else a request does (HTTP, multipart, decoding, colour, queueing, PNG encoding, metrics, logs) runs
unchanged, so the CPU this server spends per pair is what the service adds to the model (``bench/load.py``).

    python bench/service_only.py --port 8000 --weights fast
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import app.http.main  # noqa: E402
from dmfnet.cli import main  # noqa: E402
from models.images.pair_input import FusionResult, with_colour  # noqa: E402
from models.inference.fuser import Fuser  # noqa: E402


class NoWorkFuser:
    """Wraps a real pipeline; ``fuse`` answers every pair with its MRI luminance (merged with its chroma)."""

    def __init__(self, inner: Fuser) -> None:
        self.inner = inner

    def fuse(self, pairs: list, alive=None) -> list[FusionResult]:  # noqa: ANN001, D102
        return with_colour(self.fuse_lumas(pairs), pairs)

    def fuse_lumas(self, pairs: list, alive=None) -> list:  # noqa: ANN001, D102 - what the model process calls
        return [p.mri_y for p in pairs]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


_real_load = app.http.main._load


def _load_no_work(settings, weights: str) -> NoWorkFuser:  # noqa: ANN001
    return NoWorkFuser(_real_load(settings, weights))


if __name__ == "__main__":
    app.http.main._load = _load_no_work  # the one seam: how the service builds a tier's pipeline
    sys.exit(main(["serve", *sys.argv[1:]]))
