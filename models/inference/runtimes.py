"""Inference runtimes: torch eager, or the exported ONNX graph (:mod:`models.inference.export`) on ONNX Runtime
or OpenVINO.

Everything around the model (decoding, YCbCr, padding, tiling, cancellation, provenance) stays the pipeline's
code; only the padded-batch call changes (``Fuser.use_graph``). The shipped weights come with their graphs
already exported (``weights/*.onnx``, checksummed in weights.json), so ONNX Runtime, installed by default,
starts at once. Other weights files are exported once into a cache folder (``DMFNET_CACHE_DIR``, default
``~/.cache/dmfnet``), named after the weights' sha256 (12 s for the fast tier, 54 s for DM-FNet on 2 cores),
which needs the export tools. OpenVINO and the export tools are optional (``pip install .[runtimes]``):
asking for what is not installed is a clear error. Asking for nothing picks by measurement
(:func:`default_runtime`); if that automatic choice cannot get or load the graph, torch runs instead, with a
warning in the log.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from models.inference.errors import RuntimeUnavailable
from models.inference.fuser import Fuser
from models.inference.kinds import WEIGHTS_DIR
from models.inference.manifest import expected_checksum, sha256_file

RUNTIMES = ("torch", "onnxruntime", "openvino")
log = logging.getLogger("dmfnet.runtimes")
Graph = Callable[[dict[str, np.ndarray]], np.ndarray]


def cache_dir() -> Path:
    """Where exported graphs are kept (``DMFNET_CACHE_DIR`` or ``~/.cache/dmfnet``)."""
    return Path(os.environ.get("DMFNET_CACHE_DIR") or Path.home() / ".cache" / "dmfnet")


def default_runtime(device: torch.device | str, precision: str = "fp32") -> str:
    """The runtime used when none is asked for, by measurement (``bench/runtimes.py``, 2 threads, 256 px).
    The exported graphs are fp32. Where torch also runs fp32 (a 2-core Xeon with AVX-512F but no fast bf16),
    ONNX Runtime beat it (fast tier 45.8 vs 35.1 pairs/s, DM-FNet 1.44 vs 1.02); where torch runs bf16 (a
    2-core AMD EPYC with AVX512-BF16), torch beat ONNX Runtime (84.8 vs 34.8, 4.05 vs 2.92). So: ONNX Runtime
    for an fp32 pipeline on a CPU, torch for a bf16 one and on CUDA (the only runtime this project runs there)."""
    if torch.device(device).type != "cpu" or precision == "bf16":
        return "torch"
    return "onnxruntime" if importlib.util.find_spec("onnxruntime") is not None else "torch"


def graph_name(pipe: Fuser) -> str:
    """File name of a pipeline's graph: the model and the first 16 hex digits of its weights' checksum."""
    key = pipe.weights_sha256 or hashlib.sha256(str(pipe.weights_path).encode()).hexdigest()
    return f"{pipe.model_name}-{key[:16]}.onnx"


def shipped_graph(pipe: Fuser) -> Path | None:
    """The graph exported from the shipped weights and shipped beside them (weights/, checksummed in
    weights.json), so ONNX Runtime starts without an export (and without the export tools); None otherwise."""
    path = WEIGHTS_DIR / graph_name(pipe)
    expected = expected_checksum(path)
    if not path.exists() or expected is None:
        return None
    if sha256_file(path) != expected:
        log.warning("shipped graph %s does not match weights.json; exporting instead", path.name)
        return None
    return path


def exported_graph(pipe: Fuser, folder: Path | None = None) -> Path:
    """The pipeline's ONNX graph: shipped with the weights, or exported on first use and cached by checksum."""
    shipped = shipped_graph(pipe) if folder is None else None
    if shipped is not None:
        return shipped
    folder = folder or cache_dir()
    path = folder / graph_name(pipe)
    if not path.exists():
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as exc:
            raise RuntimeUnavailable(f"exporting needs onnx and onnxscript ({exc.name} missing); "
                                     "pip install '.[runtimes]'") from None
        from models.inference.export import export_onnx

        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=folder)
        os.close(fd)
        try:
            export_onnx(pipe, tmp)
            os.replace(tmp, path)  # atomic: concurrent starts never read a half-written graph
        finally:
            Path(tmp).unlink(missing_ok=True)
    return path


def onnxruntime_graph(path: Path, threads: int) -> Graph:
    """An ONNX Runtime CPU session as a feeds -> output callable."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeUnavailable("onnxruntime is not installed (it is a dependency: reinstall dmfnet)") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)[0]


def openvino_graph(path: Path, threads: int) -> Graph:
    """An OpenVINO CPU compiled model as a feeds -> output callable (reads the ONNX file directly)."""
    try:
        import openvino as ov
    except ImportError:
        raise RuntimeUnavailable("openvino is not installed; pip install '.[runtimes]'") from None
    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads})
    compiled = core.compile_model(core.read_model(str(path)), "CPU")
    request = compiled.create_infer_request()
    return lambda feeds: request.infer(feeds)[compiled.output(0)].copy()


def use_runtime(pipe: Fuser, runtime: str | None, folder: Path | None = None) -> Fuser:
    """Switch ``pipe`` to ``runtime`` (None: ``DMFNET_RUNTIME``, else :func:`default_runtime`); returns it."""
    asked = runtime or os.environ.get("DMFNET_RUNTIME")
    if not asked:
        chosen = default_runtime(pipe.device, pipe.precision)
        try:
            return use_runtime(pipe, chosen, folder)
        except Exception as exc:  # the automatic choice must never stop the tool: torch always works
            log.warning("runtime %s unavailable (%s: %s); using torch", chosen, type(exc).__name__, exc)
            return pipe
    runtime = asked
    if runtime not in RUNTIMES:
        raise RuntimeUnavailable(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return pipe
    if pipe.device.type != "cpu":
        raise RuntimeUnavailable(f"runtime {runtime} runs on the CPU here; use torch on {pipe.device}")
    path = exported_graph(pipe, folder)
    threads = torch.get_num_threads()
    graph = onnxruntime_graph(path, threads) if runtime == "onnxruntime" else openvino_graph(path, threads)
    pipe.use_graph(runtime, graph)
    return pipe
