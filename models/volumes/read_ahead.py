"""Read a study's volumes in a second process while this one imports torch and loads the weights.

Why a process: from the shell, ``import torch`` alone took 1.7 s on the 2-core Xeon (AMX) and reading the real
35-slice Siemens T1 plus a PET NIfTI 0.9 s (pydicom's import and the strict parse of every element). Both are
Python holding the GIL, so a thread does not overlap them (measured: 2.2-2.7 s with a thread, 2.3-2.5 s one after
the other); a spawned process on the second core does, and the volumes come back pickled (~12 MB without the
DICOM datasets, which only a DICOM output asks for), taken off the pipe by a thread here as soon as they come.
The child imports no torch and runs exactly the reader this process would run, so the result is the same.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections.abc import Callable
from typing import Any


def _run(conn: Any, fn: Callable, args: tuple) -> None:  # noqa: ANN401 - a multiprocessing Connection
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it where it would have
        try:
            conn.send(("error", exc))
        except Exception:  # noqa: BLE001 - an exception that does not pickle: its type and text
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
    finally:
        conn.close()


class ReadAhead:
    """``fn(*args)`` started now in a spawned process; :meth:`result` waits for it and returns it or raises what
    it raised. ``fn`` must be importable by name (a module-level function)."""

    def __init__(self, fn: Callable, *args: Any) -> None:  # noqa: ANN401
        ctx = mp.get_context("spawn")  # fork after torch's thread pools started is unsafe; spawn imports no torch
        self._conn, theirs = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_run, args=(theirs, fn, args), name="dmfnet-read-ahead", daemon=True)
        self._proc.start()
        theirs.close()
        # The answer (~12 MB for the real T1 and a PET) is taken off the pipe as soon as it comes, by a thread:
        # the child's send blocks on the 64 KB pipe until someone reads, and read in result() it cost the
        # critical path ~0.15-0.25 s after the model had loaded. os.read releases the GIL, so this overlaps torch.
        self._received: tuple[str, Any] | None = None
        self._receiver = threading.Thread(target=self._receive, name="dmfnet-read-ahead-receiver", daemon=True)
        self._receiver.start()

    def _receive(self) -> None:
        try:
            self._received = self._conn.recv()
        except (EOFError, OSError):  # the child died, or close() closed the pipe under us
            self._received = None
        except Exception as exc:  # noqa: BLE001 - an answer that does not unpickle here: raised by result()
            self._received = ("error", RuntimeError(f"the reading process's answer could not be read: "
                                                    f"{type(exc).__name__}: {exc}"))

    def result(self) -> Any:  # noqa: ANN401
        """The function's return value (raises its exception; RuntimeError if the process died)."""
        self._receiver.join()
        self._conn.close()
        self._proc.join(5)
        if self._received is None:
            raise RuntimeError(f"the reading process exited (code {self._proc.exitcode})")
        status, payload = self._received
        self._received = None  # the volumes live on in the caller only
        if status == "error":
            raise payload
        return payload

    def close(self) -> None:
        """Stop the process if its result was never taken (the caller failed first)."""
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._receiver.join(5)  # the pipe's far end is gone: its recv ends with EOF
        self._conn.close()
