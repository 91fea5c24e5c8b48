"""A shipped tier's exported graph on ONNX Runtime, without torch: the one-shot command's fast path.

``import torch`` alone costs 1.3-1.5 s on the 2-core machines here, more than the fast tier needs for a 35-slice
study; ONNX Runtime loads in ~0.2 s. So a one-shot ``dmfnet fuse`` of the fast tier on the CPU runs the graph
shipped beside the weights (``weights/dmfnet-fast-*.onnx``, checksummed in weights.json, its provenance in the
graph's metadata) and never imports torch, where that is measured to pay (:func:`graph_pays`). The tiling,
padding, colour and provenance are the torch pipeline's own (:class:`~models.inference.luma_fusion.LumaFuser`);
only the network call differs: ONNX Runtime fp32, pair by pair, as ``--runtime onnxruntime`` runs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from models.inference.hardware import cpu_has_fast_bf16
from models.inference.kinds import WEIGHTS_DIR, kind
from models.inference.luma_fusion import LumaFuser
from models.inference.manifest import manifest_files, sha256_file
from models.inference.tiling import DEFAULT_OVERLAP, DEFAULT_TILE

log = logging.getLogger("dmfnet.runtimes")
GRAPH_INPUTS = ["mri", "other"]  # graphs with more inputs (DM-FNet's fixed noise) need their torch pipeline
# The most MR pixels a study may have for the graph to be chosen on a CPU where torch would run bf16. There
# torch's kernels cost ~13 ms per 256 px slice against the graph's ~23 ms, and its import ~1.5 s more: even at
# ~150 slices (2-core Xeon with AMX, `dmfnet fuse` of 35/70/140/280-slice studies, docs/performance.md).
SMALL_JOB_PIXELS = 128 * 256 * 256


class GraphFuser(LumaFuser):
    """The fast tier's exported graph (inputs ``mri``, ``other``) on ONNX Runtime's CPU provider, fp32."""

    runtime = "onnxruntime"
    precision = "fp32"
    channels_last = False
    chunk_size = 1

    def __init__(self, graph: Path, weights_path: str, threads: int | None = None, tile_size: int = DEFAULT_TILE,
                 tile_overlap: int = DEFAULT_OVERLAP) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        inputs = [i.name for i in self._session.get_inputs()]
        if inputs != GRAPH_INPUTS:
            raise ValueError(f"{graph.name}: inputs {inputs}, not {GRAPH_INPUTS}: run it through its torch pipeline")
        meta = self._session.get_modelmeta().custom_metadata_map
        super().__init__(int(meta["size_multiple"]), weights_path, meta["weights_sha256"], tile_size, tile_overlap)
        self._model = meta["model"]
        self.device = "cpu"

    @property
    def model_name(self) -> str:  # noqa: D102 - the graph's metadata says which model it was exported from
        return self._model

    def describe(self) -> dict:
        """The same fields as the torch pipelines' ``describe``."""
        return {"model": self.model_name, "device": "cpu", "precision": self.precision,
                "channels_last": False, "chunk_size": 1, "tile_size": self.tile_size,
                "tile_overlap": self.tile_overlap, "weights": self.weights_path,
                "weights_sha256": self.weights_sha256, "random_init": False, "runtime": self.runtime}

    def _fuse_padded(self, mri_y: np.ndarray, func_y: np.ndarray, stop: Callable[[], bool]) -> np.ndarray:
        return self._pair_by_pair(mri_y.shape[0], lambda i: self._session.run(
            None, {"mri": mri_y[i : i + 1], "other": func_y[i : i + 1]})[0], stop)


def shipped_graph_fuser(tier: str, threads: int | None = None, tile_size: int = DEFAULT_TILE,
                        tile_overlap: int = DEFAULT_OVERLAP) -> GraphFuser | None:
    """The graph shipped for ``tier``'s weights, verified (its checksum in weights.json, and exported from the
    shipped weights' checksum); None when there is none or it does not verify (the caller runs torch)."""
    files = manifest_files()
    weights_file = kind(tier).weights_file
    weights_sha = files.get(weights_file, {}).get("sha256")
    for name, entry in files.items():
        if entry.get("graph_of") != weights_file:
            continue
        path = WEIGHTS_DIR / name
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            log.warning("shipped graph %s is missing or does not match weights.json; using torch", name)
            return None
        try:
            fuser = GraphFuser(path, str(WEIGHTS_DIR / weights_file), threads, tile_size, tile_overlap)
        except (ImportError, ValueError, KeyError) as exc:
            log.warning("shipped graph %s cannot run here (%s); using torch", name, exc)
            return None
        if fuser.weights_sha256 != weights_sha:
            log.warning("shipped graph %s was exported from other weights; using torch", name)
            return None
        return fuser
    return None


def graph_pays(tier: str | None, device: str | None, precision: str, runtime: str | None,
               pixels: int | None) -> bool:
    """Whether a one-shot command should run ``tier``'s shipped graph without torch.

    Only the fast tier (DM-FNet's graph needs its torch pipeline's noise), only on the CPU (no ``--device``
    other than cpu, and no NVIDIA driver when none is given: torch would pick the GPU), only when no other
    runtime or bf16 is asked for. Where torch would run fp32 ONNX Runtime is the faster runtime anyway
    (:func:`models.inference.runtimes.default_runtime`); where torch would run bf16 (AMX, AVX512-BF16), only a
    study of at most :data:`SMALL_JOB_PIXELS` (``pixels``: the MR's, None when unknown).
    """
    if tier != "fast" or runtime not in (None, "onnxruntime") or precision == "bf16":
        return False
    if device not in (None, "cpu") or (device is None and Path("/proc/driver/nvidia/version").exists()):
        return False
    if runtime == "onnxruntime" or precision == "fp32" or not cpu_has_fast_bf16():
        return True
    return pixels is not None and pixels <= SMALL_JOB_PIXELS
