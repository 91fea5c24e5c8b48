"""What a job can end in besides a fused pair: the engine's refusals and failures, each mapped by the HTTP layer
to its status (app/http/state.py), and the mapping of whatever the model raised to what the request is told."""

from __future__ import annotations

import sys


class QueueFull(Exception):
    """The queue is at capacity: the client should retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full, retry after {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The engine is stopping and takes no new work (or could not finish this job in the grace period)."""


class OutOfMemory(Exception):
    """The device (or host) ran out of memory for this pair; the model thread stays alive for the next one."""


class ModelLost(RuntimeError):
    """The model (its process: model_process.py) stopped while it held this pair; a new one takes the next."""


class DeadlineExceeded(Exception):
    """The job's deadline passed (in the queue or during fusion); its work was dropped."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA out-of-memory (torch.OutOfMemoryError) or a host MemoryError (torch is only looked at when this
    process already loaded it: the HTTP process of a model process never does)."""
    torch = sys.modules.get("torch")
    return isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.OutOfMemoryError))


def failure(exc: BaseException) -> BaseException:
    """What the request is told: out of memory (retry later, 503), the model process lost with the pair (503:
    the next call starts a new one), or a plain fusion failure (500)."""
    if is_out_of_memory(exc):
        return OutOfMemory("not enough memory to fuse this pair now; retry later or send a smaller image")
    if isinstance(exc, ModelLost):
        return exc
    return RuntimeError(f"fusion failed: {type(exc).__name__}")
