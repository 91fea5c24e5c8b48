"""What the current hardware does fast: decides bf16 vs fp32 and memory format when asked for "auto".

bf16 pays on CUDA and on CPUs with AMX or AVX512-BF16 (measured ~8x matmul speed-up on an AMX Xeon);
on an AVX2-only CPU it is emulated and ~400x *slower* than fp32 (measured on a 2-core AMD EPYC:
0.3 vs 138 GFLOP/s), so "auto" must look before choosing.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a device is resolved: the CPU checks stay torch-free
    import torch

PRECISIONS = ("auto", "bf16", "fp32")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(w for line in text.splitlines() if line.startswith("flags") for w in line.split(":", 1)[1].split())


def describe_cpu() -> str:
    """The CPU's model name and its bf16 features, as benchmarks record where a number came from."""
    import platform

    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    features = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")) if flag in cpu_flags()]
    return f"{names[0] if names else platform.processor() or platform.machine()} ({len(names) or '?'} cores" + \
        (f", {' + '.join(features)})" if features else ", no fast bf16)")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU advertises AMX-BF16 or AVX512-BF16."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())



def resolve_precision(requested: str, device: torch.device | str) -> str:
    """Map "auto" to "bf16" where it is fast on ``device``, else "fp32"; check explicit values."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested != "auto":
        return requested
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def resolve_channels_last(requested: bool | None, precision: str) -> bool:
    """channels_last pays with bf16 (oneDNN/cuDNN blocked kernels); in fp32 on CPU it measured slower."""
    return (precision == "bf16") if requested is None else requested


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA and fast-bf16 CPUs when ``precision`` is bf16; nothing for fp32."""
    if precision == "bf16":
        import torch

        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Have glibc serve large tensors from the heap and keep freed memory for the next ones, instead of a fresh
    mmap per tensor given back on free (every fresh mapping is faulted in and zeroed page by page on first touch).
    For batch commands that end when done: the process's memory stays at its high-water mark. The 35-pair DM-FNet
    pipeline measured 6.6-9.3 s against 9.1-13.6 s (three runs each, interleaved; 2-core Xeon, AMX, bf16). Returns
    whether glibc took both settings (False on other C libraries)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):
        return False
