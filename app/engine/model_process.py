"""The model in its own process: every tier's pipeline lives in one child; the HTTP process keeps a proxy.

Why: torch dispatches each operator from Python, and every dispatch needs the GIL. In one process the event loop
(HTTP, multipart, JSON, logging) holds the GIL for milliseconds at a time, and the model thread waits for it
between operators: the fast tier with one torch thread did 78-85 pairs/s alone, 2.0 beside one spinning Python
thread and 80-84 beside a spinning Python process (``bench/contention.py``). In a child the model has its own
interpreter; the two processes share only the CPUs.

The protocol is one request at a time over a pipe (the service has one model thread): the parent sends a batch's
luminances, the child answers the fused luminances (or a failure); colour is put back in the parent, so only
two planes go out and one comes back. The planes travel through a shared arena (``PLANE_ARENA_BYTES``, mapped by
both processes) when the call fits in it, the child reading its inputs in place; larger calls write each plane
through the pipe from its array's own memory (no pickled copy).
Cancellation crosses as one byte per pair in shared memory: the parent's model thread keeps evaluating each
pair's ``alive`` while it waits and the child reads the flags between chunks and tiles, as it would in-process.
The child ignores SIGINT/SIGTERM (the parent drains and tells it to stop) and gives up its work when the parent
is gone. If the child dies, the batch fails and the next call starts a fresh one; a child that keeps working
long after all its work was dropped is hung, and is killed.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from app.engine.admission import resident_bytes
from app.engine.memory import keep_buffers_for_reuse, release_free_memory
from app.engine.outcomes import ModelLost, is_out_of_memory
from models.images.pair_input import FusionResult, PairInput, with_colour

log = logging.getLogger("dmfnet.model_process")

MAX_PAIRS = 1024  # pairs per call (the engine sends at most max_batch_size, <= 256)
POLL_S = 0.01  # how often the waiting parent re-evaluates ``alive`` (deadline granularity)
# The child reads the dropped flags between chunks and tiles; a chunk of the full model takes under 1 s on the
# 2-core EPYC (4.7 pairs/s at 256 px, at most 3 pairs or tiles per call). A child still busy this long after every
# pair of its call was dropped is hung (a stuck kernel, a deadlock): it is killed and replaced.
HUNG_AFTER_S = 10.0
# Shared plane arena: a call whose planes (two in, one out per pair, float32) fit crosses without the pipe. The
# pipe cost ~0.5 ms of CPU per 256 px pair on the 2-core EPYC (a socket write and a buffered read on each side);
# 16 MB holds 8 pairs of 256 px or 5 of 512 px. It is an anonymous shared mapping (multiprocessing's heap:
# /dev/shm when it has room, else a deleted file in the temp directory), so Docker's 64 MB /dev/shm is no limit.
PLANE_ARENA_BYTES = 16 << 20
START_TIMEOUT_S = 600.0  # loading the full model on a slow CPU, graph runtimes included


class ModelProcessDied(ModelLost):
    """The child exited (crash, out-of-memory kill) while it held this batch."""


@dataclass(frozen=True)
class LoadOptions:
    """What the child needs to load the tiers (never the API key or anything else of the settings)."""

    names: tuple[str, ...]
    threads: int | None
    device: str | None
    precision: str
    chunk_size: int | None
    tile_size: int
    tile_overlap: int
    runtime: str | None
    log_json: bool
    log_level: str


def _tier_facts(pipe: Any) -> dict[str, Any]:  # noqa: ANN401 - a Fuser
    """What the HTTP process reads from a pipeline (headers, provenance, /info, metrics)."""
    return {"is_random": pipe.is_random, "weights_path": pipe.weights_path, "weights_sha256": pipe.weights_sha256,
            "model_name": pipe.model_name, "describe": pipe.describe(), "provenance": pipe.provenance()}


def _child(conn: Connection, dropped: Any, arena: Any, options: LoadOptions,  # noqa: ANN401
           loader: Callable) -> None:
    """The child's life: load every tier, report what the parent needs, then fuse batches until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the whole group: the parent
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # drains first, then closes this process itself
    from app.logs import configure_logging

    configure_logging(options.log_json, options.log_level)
    keep_buffers_for_reuse()
    parent = os.getppid()
    try:
        pipes = {name: loader(options, name) for name in options.names}
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops start-up with it
        conn.send(("failed", type(exc).__name__, str(exc)))
        return
    conn.send(("ready", {name: _tier_facts(p) for name, p in pipes.items()}))

    def alive(i: int) -> bool:
        return dropped[i] == 0 and os.getppid() == parent

    shared = np.frombuffer(arena, np.float32)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        _, tier, modalities, shapes = message  # shapes: the inputs are in the arena; None: they follow on the pipe
        planes = _recv_planes(conn) if shapes is None else _views(shared, 0, shapes)
        used = sum(int(np.prod(shape)) for shape in shapes or ())
        pairs = [PairInput(planes[2 * k], planes[2 * k + 1], None, m) for k, m in enumerate(modalities)]
        del planes
        lumas = None
        try:
            lumas, reply = pipes[tier].fuse_lumas(pairs, alive), ("ok",)
        except Exception as exc:  # noqa: BLE001 - sent back as this batch's failure
            reply = ("error", type(exc).__name__, str(exc), is_out_of_memory(exc))
        finally:
            release_free_memory(pairs)  # the tiled working set of a large pair lives here, not in the parent
        del pairs
        try:
            if lumas is not None and shapes is not None and _fits(shared, used, lumas):
                conn.send((*reply, _place(shared, used, lumas)))
            else:
                conn.send(reply)
                if lumas is not None:
                    _send_planes(conn, lumas)
        except (BrokenPipeError, OSError):
            return


def _send_planes(conn: Connection, planes: list[np.ndarray | None]) -> None:
    """Shapes first (None for a dropped pair), then each float32 plane's bytes written from its own memory (a
    pickled message would copy every plane once more: 64 MB for one 4096 px plane)."""
    conn.send([None if p is None else p.shape for p in planes])
    for p in planes:
        if p is not None:
            conn.send_bytes(memoryview(np.ascontiguousarray(p, dtype=np.float32)).cast("B"))


def _fits(shared: np.ndarray, start: int, planes: list[np.ndarray | None]) -> bool:
    """Whether ``planes`` fit in the arena from float ``start`` on."""
    return start + sum(p.size for p in planes if p is not None) <= shared.size


def _place(shared: np.ndarray, start: int, planes: list[np.ndarray | None]) -> list[tuple[int, ...] | None]:
    """Copy ``planes`` into the arena one after another from float ``start``; returns their shapes (None kept)."""
    for p in planes:
        if p is not None:
            view = shared[start:start + p.size].reshape(p.shape)
            np.copyto(view, p, casting="same_kind")
            start += p.size
    return [None if p is None else p.shape for p in planes]


def _views(shared: np.ndarray, start: int, shapes: list[tuple[int, ...] | None]) -> list[np.ndarray | None]:
    """The arena's planes of these shapes, laid out by :func:`_place` from float ``start`` (views, no copy)."""
    out: list[np.ndarray | None] = []
    for shape in shapes:
        if shape is None:
            out.append(None)
            continue
        size = int(np.prod(shape))
        out.append(shared[start:start + size].reshape(shape))
        start += size
    return out


def _recv_planes(conn: Connection) -> list[np.ndarray | None]:
    """The planes :func:`_send_planes` wrote, each read into a new float32 array."""
    out: list[np.ndarray | None] = []
    for shape in conn.recv():
        plane = None if shape is None else np.empty(shape, np.float32)
        if plane is not None:
            conn.recv_bytes_into(memoryview(plane).cast("B"))
        out.append(plane)
    return out


class ModelProcess:
    """The child holding every tier (start with :meth:`start`, call :meth:`fuse_lumas` from one thread at a
    time)."""

    def __init__(self, options: LoadOptions, loader: Callable) -> None:
        self.options, self.loader = options, loader
        self._ctx = mp.get_context("spawn")  # fork after torch (and its thread pools) started is unsafe
        self._dropped = self._ctx.RawArray("b", MAX_PAIRS)
        self._arena = self._ctx.RawArray("b", PLANE_ARENA_BYTES)  # shared with every child this object starts
        self._shared = np.frombuffer(self._arena, np.float32)
        self._proc: Any = None
        self._conn: Connection | None = None
        self._broken = False
        self._lock = threading.Lock()
        self.facts: dict[str, dict[str, Any]] = {}
        self.restarts = 0

    def start(self) -> dict[str, dict[str, Any]]:
        """Start the child and wait until every tier is loaded; raises RuntimeError with the child's reason."""
        ours, theirs = self._ctx.Pipe()
        proc = self._ctx.Process(target=_child, args=(theirs, self._dropped, self._arena, self.options, self.loader),
                                 name="dmfnet-model", daemon=True)
        proc.start()
        theirs.close()
        if not ours.poll(START_TIMEOUT_S):
            proc.kill()
            raise RuntimeError(f"the model process did not load within {START_TIMEOUT_S:.0f} s")
        try:
            message = ours.recv()
        except EOFError:
            raise RuntimeError(f"the model process exited while loading (exit code {proc.exitcode})") from None
        if message[0] != "ready":
            proc.join(5)
            raise RuntimeError(f"loading the model failed: {message[1]}: {message[2]}")
        self._proc, self._conn, self.facts, self._broken = proc, ours, message[1], False
        log.info("model process ready", extra={"pid": proc.pid, "tiers": ",".join(self.facts)})
        return self.facts

    @property
    def pid(self) -> int | None:
        """The child's process id (None before start)."""
        return self._proc.pid if self._proc is not None else None

    def fuse_lumas(self, tier: str, pairs: list[PairInput], alive: Callable[[int], bool]) -> list[np.ndarray | None]:
        """Fused luminance per pair (None: dropped) from the child; raises MemoryError, RuntimeError or
        :class:`ModelProcessDied` for the whole call."""
        if len(pairs) > MAX_PAIRS:
            raise ValueError(f"at most {MAX_PAIRS} pairs per call")
        with self._lock:
            if self._proc is None or self._broken or not self._proc.is_alive():
                self._restart()
            assert self._conn is not None
            for i in range(len(pairs)):
                self._dropped[i] = 0
            planes = [plane for p in pairs for plane in (p.mri_y, p.func_y)]
            # In the arena when the answers (one MRI-sized plane per pair) fit after the inputs, else the pipe.
            shared = _fits(self._shared, 0, planes + [p.mri_y for p in pairs])
            answers_at = sum(plane.size for plane in planes)  # where the child puts its answers in the arena
            try:
                self._conn.send(("fuse", tier, [p.modality for p in pairs], _place(self._shared, 0, planes)
                                 if shared else None))
                if not shared:
                    _send_planes(self._conn, planes)
                del planes
                self._wait(len(pairs), alive)
                reply = self._conn.recv()
                lumas = None
                if reply[0] == "ok":  # the answers' shapes when they came through the arena (copied out of it)
                    lumas = _recv_planes(self._conn) if len(reply) == 1 else [
                        None if v is None else v.copy() for v in _views(self._shared, answers_at, reply[1])]
            except (EOFError, BrokenPipeError, ConnectionResetError):
                self._broken = True  # whatever is_alive() says (an exit not yet reaped): the next call restarts
                self._proc.join(1)
                code = self._proc.exitcode
                log.error("model process died during a batch", extra={"exit_code": code})
                raise ModelProcessDied(f"the model process exited during this batch (exit code {code})") from None
        if lumas is not None:
            return lumas
        _, name, detail, memory = reply
        if memory:
            raise MemoryError(f"{name} in the model process: {detail}")
        raise RuntimeError(f"{name} in the model process: {detail}")

    def _wait(self, n: int, alive: Callable[[int], bool]) -> None:
        """Until the child answers: pass each pair's "dropped" across, and kill a child that keeps working long
        after every pair was dropped (the call then fails with :class:`ModelProcessDied`)."""
        assert self._conn is not None
        all_dropped_at = None
        while not self._conn.poll(POLL_S):
            for i in range(n):
                if not self._dropped[i] and not alive(i):
                    self._dropped[i] = 1
            if all_dropped_at is None and all(self._dropped[i] for i in range(n)):
                all_dropped_at = time.monotonic()
            if all_dropped_at is not None and time.monotonic() - all_dropped_at > HUNG_AFTER_S:
                log.error("model process ignored dropped work; killing it", extra={"after_s": HUNG_AFTER_S})
                self._proc.kill()  # the caller's read then meets EOF: ModelProcessDied
                return

    def _restart(self) -> None:
        self.restarts += 1
        log.warning("starting a new model process", extra={"restarts": self.restarts})
        self.close()
        self.start()

    def resident_bytes(self) -> int:
        """The child's resident memory (0 when it is not running)."""
        return 0 if self.pid is None else resident_bytes(self.pid)

    def close(self, timeout_s: float = 5.0) -> None:
        """Ask the child to stop (it finishes nothing: call after the engines drained); kill it if it lingers."""
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            try:
                conn.send(("stop",))
            except OSError:
                pass
            conn.close()
        if proc is not None:
            proc.join(timeout_s)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout_s)


class RemoteFuser:
    """One tier of the model process, shaped like a :class:`~models.inference.fuser.Fuser` for the batching engine
    and the HTTP layer: ``fuse`` (colour put back here), provenance and description."""

    def __init__(self, process: ModelProcess, tier: str) -> None:
        self.process, self.tier = process, tier
        facts = process.facts[tier]
        self.is_random: bool = facts["is_random"]
        self.weights_path: str | None = facts["weights_path"]
        self.weights_sha256: str | None = facts["weights_sha256"]
        self.model_name: str = facts["model_name"]
        self._describe: dict = facts["describe"]
        self._provenance: dict[str, str] = facts["provenance"]

    def describe(self) -> dict:
        """The tier's description, as the child's pipeline gave it (with where it runs)."""
        return {**self._describe, "model_process_pid": self.process.pid}

    def provenance(self) -> dict[str, str]:
        """Provenance text chunks of every fused PNG."""
        return dict(self._provenance)

    def fuse(self, pairs: list[PairInput], alive: Callable[[int], bool] | None = None) -> list[FusionResult | None]:
        """Fuse in the child; put the functional image's colour back here."""
        return with_colour(self.process.fuse_lumas(self.tier, pairs, alive or (lambda i: True)), pairs)
