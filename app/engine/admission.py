"""Admission by memory: every pair reserves its decoded size before it is decoded.

A 4096x4096 colour pair is a few hundred kB as PNG but ~0.25 GB as float planes (plus transients while
decoding), so counting pairs alone let one 626 kB ``/fuse/batch`` move the server's RSS by 2.4 GB. Requests
now hold their compressed bytes until a reservation is granted; the reservation covers decoding, waiting in
the queue, the fused result and its PNG, and is released when the response is built. The model's own
working set is bounded by tiling and lives outside the budget (the default budget leaves room for it).
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.engine.memory import trim_heap
from models.images.imaging import ImageHeader

# Bytes per pixel held while a pair is in the service, measured with tracemalloc on 2048^2 and 4096^2 pairs
# (decode_pair peaks at 40 B/px for gray MR + colour PET and holds 16 B/px; the result adds 12 B/px RGB):
# per image while decoding, and per output pixel for the result and its encoding.
DECODE_BYTES_PER_PIXEL = {1: 12, 3: 36}
RESULT_BYTES_PER_PIXEL = {1: 6, 3: 16}
TRIM_AFTER_BYTES = 256 << 20  # once this much reserved memory was given back, the heap is trimmed
TRIM_DELAY_S = 2.0  # ... this long after (the answers holding the results are out by then)


def pair_cost(mri: ImageHeader, functional: ImageHeader) -> int:
    """Bytes one pair may hold from decoding to its encoded result (an upper estimate, from the headers)."""
    decode = sum(h.pixels * DECODE_BYTES_PER_PIXEL[h.bands] for h in (mri, functional))
    return decode + mri.pixels * RESULT_BYTES_PER_PIXEL[functional.bands]


def memory_limit_bytes() -> int:
    """The container's memory limit (cgroup v2 or v1) or, without one, the machine's RAM."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            return int(text)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def address_space_left() -> int | None:
    """Bytes this process may still map under an address-space limit (``ulimit -v``, RLIMIT_AS), or None when
    there is none. Decoded images need address space, not only memory."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        mapped = 0
    return max(0, soft - mapped)


def resident_bytes(pid: int | str = "self") -> int:
    """A process's resident set size (Linux /proc; 0 where unknown or gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def default_budget_bytes(resident_bytes: int) -> int:
    """Half of what the memory limit leaves after the loaded model (the other half: the model's working set, the
    allocator's slack and the Python heap), and no more than half the address space left under RLIMIT_AS; at
    least 256 MB."""
    budget = (memory_limit_bytes() - resident_bytes) // 2
    left = address_space_left()
    if left is not None:
        budget = min(budget, left // 2)
    return max(256 << 20, budget)


class NeverFits(Exception):
    """One pair needs more than the whole budget: no wait will help (413)."""


class MemoryBusy(Exception):
    """The budget is taken by work in progress now (503; retry later)."""


@dataclass
class Reservation:
    """Bytes held against the budget; ``release`` is idempotent."""

    budget: MemoryBudget
    size: int
    released: bool = False

    def release(self) -> None:  # noqa: D102
        if not self.released:
            self.released = True
            self.budget._give_back(self.size)


class MemoryBudget:
    """A byte budget shared by all requests of one service, granted first come, first served.

    Used from the event loop only (no locks needed).
    """

    def __init__(self, limit: int, trim_after_bytes: int = TRIM_AFTER_BYTES,
                 trim: Callable[[], object] = trim_heap) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()
        self._trim_after, self._trim, self._freed = trim_after_bytes, trim, 0
        self._trim_pending = False

    def try_reserve(self, size: int) -> Reservation:
        """Reserve now or raise (NeverFits / MemoryBusy); never waits."""
        held = self._take_now(size)
        if held is None:
            raise MemoryBusy(f"{_mb(size)} MB needed, {_mb(self.limit - self.used)} MB of {_mb(self.limit)} MB free")
        return held

    async def reserve(self, size: int, deadline: float) -> Reservation:
        """Reserve, waiting in line until ``deadline`` (``time.monotonic()``); MemoryBusy when it passes."""
        held = self._take_now(size)
        if held is not None:
            return held
        fut = asyncio.get_running_loop().create_future()
        entry = (size, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
        except BaseException as exc:  # the deadline passed, or the caller was cancelled (client gone)
            if fut.done() and not fut.cancelled():  # granted in the same instant: hand it back
                self._give_back(size)
            elif entry in self._waiters:
                self._waiters.remove(entry)
                self._grant()  # a smaller waiter behind this one may fit now
            if isinstance(exc, TimeoutError):
                raise MemoryBusy(f"waited until the deadline for {_mb(size)} MB of memory") from None
            raise
        return Reservation(self, size)

    def _take_now(self, size: int) -> Reservation | None:
        """The reservation if it fits now and nobody waits ahead (NeverFits if it never could)."""
        if size > self.limit:
            raise NeverFits(f"this pair needs ~{_mb(size)} MB once decoded; the service's memory budget is "
                            f"{_mb(self.limit)} MB (DMFNET_MEMORY_BUDGET_MB): send smaller images")
        if self._waiters or self.used + size > self.limit:
            return None
        self.used += size
        return Reservation(self, size)

    def _give_back(self, size: int) -> None:
        self.used -= size
        self._freed += size
        if self._freed >= self._trim_after and not self._trim_pending:
            self._schedule_trim()
        self._grant()

    def _schedule_trim(self) -> None:
        """Hand freed heap pages back to the OS soon after large pairs are done (once their answers are out):
        glibc keeps them otherwise, and the process sat at 2 GB idle after two 4096² batches."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._trim_now()
            return
        self._trim_pending = True
        loop.call_later(TRIM_DELAY_S, self._trim_now)

    def _trim_now(self) -> None:
        self._trim_pending, self._freed = False, 0
        self._trim()

    def _grant(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.limit:
            size, fut = self._waiters.popleft()
            if fut.done():  # its waiter gave up
                continue
            self.used += size
            fut.set_result(None)


def _mb(n: int) -> int:
    return round(n / 2**20)
