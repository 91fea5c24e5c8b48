"""Giving memory back to the OS after large images.

glibc's malloc keeps freed memory of big numpy/torch buffers in its arenas, so a long-running service sits
at its high-water mark after one large pair (measured: RSS 0.5 GB idle -> 1.0-1.4 GB after 2048x2048 pairs,
for good). ``malloc_trim(0)`` hands the free pages back; it costs ~1 ms, so it runs only after batches that
held large images.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Sequence
from typing import Protocol

TRIM_AFTER_PIXELS = 1024 * 1024  # a batch with at least this many pixels per image triggers a trim
TRIM_ENABLED = os.environ.get("DMFNET_MALLOC_TRIM", "1") != "0"  # 0: off (bench/memory.py measures both)


class _Sized(Protocol):
    size: tuple[int, int]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def trim_heap() -> bool:
    """Return freed heap pages to the OS (glibc only); True when something was released."""
    lib = _libc()
    return bool(lib.malloc_trim(0)) if lib is not None else False


def release_free_memory(items: Sequence[_Sized]) -> None:
    """After a batch: trim the heap when any of its images was large (no-op for small ones and non-glibc)."""
    if TRIM_ENABLED and any(it.size[0] * it.size[1] >= TRIM_AFTER_PIXELS for it in items):
        trim_heap()
