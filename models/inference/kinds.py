"""The model kinds the project runs, one row each: which weights file format they read, which shipped tier name
(``--weights full|fast``) and file they answer to, and which pipeline (a :class:`~models.inference.fuser.Fuser`)
runs them. weights.py (loading), export.py (graphs), training and the CLI look kinds up here, so a new network is
its module in models/nets/, its pipeline (``from_weights``, ``random_init``, ``export_graph``) and one row.

Torch-free: the pipeline class is imported when a kind is used, not when the table is read.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.inference.fuser import Fuser

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"  # <repo>/weights, beside models/


@dataclass(frozen=True)
class ModelKind:
    """One network kind: its shipped tier name, weights format, shipped file and pipeline class."""

    tier: str  # the name --weights and DMFNET_WEIGHTS accept for the shipped file; also ``random:<tier>``
    format: str  # the weights file's "format" field
    weights_file: str  # the shipped file in weights/
    pipeline: str  # "module:Class" of its Fuser

    @property
    def shipped(self) -> Path:
        """The shipped weights file of this kind."""
        return WEIGHTS_DIR / self.weights_file

    def pipeline_class(self) -> type[Fuser]:
        """The Fuser subclass that runs this kind (imported now)."""
        module, _, name = self.pipeline.partition(":")
        return getattr(importlib.import_module(module), name)


KINDS = (
    ModelKind("full", "dmfnet-weights/1", "dmfnet_small.pt", "models.inference.pipeline:FusionPipeline"),
    ModelKind("fast", "dmfnet-fast-weights/1", "dmfnet_fast.pt", "models.inference.fast_pipeline:FastPipeline"),
)
FORMATS = tuple(k.format for k in KINDS)


def kind(tier: str) -> ModelKind:
    """The kind shipped under ``tier`` (KeyError names the tiers)."""
    for k in KINDS:
        if k.tier == tier:
            return k
    raise KeyError(f"no model kind {tier!r}; kinds: {', '.join(k.tier for k in KINDS)}")


def kind_of_format(fmt: str) -> ModelKind:
    """The kind whose weights files carry ``fmt``."""
    return next(k for k in KINDS if k.format == fmt)
