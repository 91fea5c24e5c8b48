"""The DICOM node's durable spool: instances pushed to ``dmfnet pacs listen`` are on disk before they are
acknowledged, studies are kept apart, and a study is handed to fusion only when it is whole and quiet.

Layout under ``spool_dir`` (names are hashes, never patient identifiers):

    incoming/                      partial writes (a crash leaves only these; removed at start)
    studies/<sha>/study.json       the StudyInstanceUID, PatientID hash, first/last arrival, attempts, state
    studies/<sha>/<series sha>/<instance sha>.dcm    one file per SOP instance (a resend overwrites it)
    studies/<sha>/open-<assoc>     an association delivered here and has not ended normally yet
    failed/<sha>/                  studies that could not be fused, with reason.json (kept ``failed_retention_s``)

Durability: each instance is written to incoming/, fsync'd, renamed into its study (atomic on one file system)
and the directory fsync'd; only then does the node answer 0x0000. A full disk or the quota answers 0xA700
(out of resources): the sender keeps the instance and retries. An association that ends without a normal
release (a crash of either side, an abort) leaves its ``open-`` marker: the study is *incomplete* and is not
fused until a later association delivers to it and ends normally (a sender re-sends what it was not
acknowledged), so a study cut short is never fused as if whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("dmfnet.pacs.spool")

OUT_OF_RESOURCES = 0xA700  # DICOM PS3.4 C-STORE status: the sender keeps the instance and retries later


class SpoolFull(OSError):
    """The spool's quota or the disk's free space would be passed."""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class StudyState:
    """One spooled study as study.json records it."""

    study_uid: str
    patient: str  # sha of PatientID + issuer: instances of another patient never join the study
    first_arrival: float
    last_arrival: float
    attempts: int = 0
    next_attempt: float = 0.0
    reported: str = ""  # the last outcome reported for it (a refusal is reported once)

    @classmethod
    def load(cls, path: Path) -> StudyState:  # noqa: D102
        return cls(**json.loads(path.read_text()))


class Spool:
    """Durable storage of pushed instances, grouped by study (see the module docstring)."""

    def __init__(self, root: Path, quota_bytes: int, min_free_bytes: int = 256 * 2**20) -> None:
        self.root, self.quota_bytes, self.min_free_bytes = Path(root), quota_bytes, min_free_bytes
        self.incoming, self.studies, self.failed = self.root / "incoming", self.root / "studies", self.root / "failed"
        for d in (self.incoming, self.studies, self.failed):
            d.mkdir(parents=True, exist_ok=True)
        for partial in self.incoming.iterdir():  # writes a crash cut short were never acknowledged
            partial.unlink(missing_ok=True)
        self.lock = threading.Lock()
        self.live: set[str] = set()  # ids of this process's associations still open (the node keeps it)
        self.bytes = sum(p.stat().st_size for p in self.studies.rglob("*.dcm"))

    # ------------------------------------------------------------------------------------------- receiving
    def study_dir(self, study_uid: str) -> Path:
        """Where a study's instances are spooled."""
        return self.studies / _sha(study_uid)

    def store(self, raw: bytes, study_uid: str, series_uid: str, sop_uid: str, patient: str, assoc: str) -> Path:
        """Write one instance durably (see the module docstring); SpoolFull when over the quota or the disk is
        nearly full; ValueError when the study already belongs to another patient."""
        size = len(raw)
        with self.lock:
            if self.bytes + size > self.quota_bytes:
                raise SpoolFull(f"spool quota of {self.quota_bytes} bytes reached")
            if shutil.disk_usage(self.root).free - size < self.min_free_bytes:
                raise SpoolFull("disk nearly full")
            folder = self.study_dir(study_uid)
            state_path = folder / "study.json"
            now = time.time()
            if state_path.exists():
                state = StudyState.load(state_path)
                if state.patient != patient:
                    raise ValueError("instance of another patient than its study's earlier instances")
                state.last_arrival = now
            else:
                folder.mkdir(parents=True, exist_ok=True)
                state = StudyState(study_uid, patient, now, now)
            marker = folder / f"open-{assoc}"
            if not marker.exists():
                marker.touch()
            target_dir = folder / _sha(series_uid)
            target_dir.mkdir(exist_ok=True)
            target = target_dir / f"{_sha(sop_uid)}.dcm"
            previous = target.stat().st_size if target.exists() else 0
        tmp = self.incoming / f"{assoc}-{_sha(sop_uid)}.part"
        try:
            with open(tmp, "wb") as out:
                out.write(raw)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
            _fsync_dir(target_dir)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        with self.lock:
            self.bytes += size - previous
            self._write_state(state)
        return target

    def hold(self, study_uid: str, assoc: str) -> None:
        """An instance of this study was refused on this association (out of resources): mark the study as
        that association's, so that, whatever else arrived, it is not fused until the sender has re-sent it on
        an association that ends normally with nothing refused."""
        folder = self.study_dir(study_uid)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"open-{assoc}").touch()

    def association_ended(self, assoc: str, normally: bool) -> list[str]:
        """An association is over: a normal release removes its markers (and those of associations a crash or
        abort cut short in the same studies: the sender re-sent); an abort keeps them. Returns the studies."""
        touched = []
        for marker in self.studies.glob(f"*/open-{assoc}"):
            folder = marker.parent
            touched.append(folder.name)
            if normally:
                for stale in folder.glob("open-*"):
                    if stale != marker and stale.name.removeprefix("open-") not in self.live:
                        stale.unlink(missing_ok=True)
                marker.unlink(missing_ok=True)
        return touched

    # ----------------------------------------------------------------------------------------- processing
    def ready(self, stable_age_s: float, now: float | None = None) -> list[Path]:
        """Studies whose last instance is ``stable_age_s`` old, with no open association (live or cut short),
        and whose next attempt is due; oldest first."""
        now = time.time() if now is None else now
        out = []
        for state_path in self.studies.glob("*/study.json"):
            folder = state_path.parent
            try:
                state = StudyState.load(state_path)
            except (OSError, ValueError):
                continue
            if now - state.last_arrival < stable_age_s or now < state.next_attempt:
                continue
            if any(folder.glob("open-*")):
                continue
            out.append((state.last_arrival, folder))
        return [f for _, f in sorted(out)]

    def incomplete(self) -> list[Path]:
        """Studies with a marker of an association that is not live: cut short by a crash or an abort."""
        return sorted({m.parent for m in self.studies.glob("*/open-*")
                       if m.name.removeprefix("open-") not in self.live})

    def state(self, folder: Path) -> StudyState:
        """study.json of a spooled study."""
        return StudyState.load(folder / "study.json")

    def _write_state(self, state: StudyState) -> None:
        folder = self.study_dir(state.study_uid)
        tmp = folder / "study.json.tmp"
        tmp.write_text(json.dumps(state.__dict__))
        os.replace(tmp, folder / "study.json")

    def update(self, state: StudyState) -> None:
        """Persist a study's state (attempts, next attempt, what was reported)."""
        with self.lock:
            self._write_state(state)

    def instances(self, folder: Path) -> list[Path]:
        """Every spooled instance file of a study."""
        return sorted(folder.glob("*/*.dcm"))

    def remove(self, folder: Path) -> None:
        """A study fused and stored (or found already stored): its instances go."""
        with self.lock:
            freed = sum(p.stat().st_size for p in folder.glob("*/*.dcm"))
            shutil.rmtree(folder, ignore_errors=True)
            self.bytes -= freed

    def fail(self, folder: Path, reason: str, keep: bool) -> None:
        """A study that cannot be fused: kept in failed/ with its reason (``keep``), else removed."""
        if not keep:
            self.remove(folder)
            return
        with self.lock:
            freed = sum(p.stat().st_size for p in folder.glob("*/*.dcm"))
            target = self.failed / folder.name
            shutil.rmtree(target, ignore_errors=True)
            os.replace(folder, target)
            (target / "reason.json").write_text(json.dumps({"reason": reason, "at": time.time()}))
            self.bytes -= freed

    def expire(self, failed_retention_s: float, incomplete_retention_s: float, now: float | None = None) -> int:
        """Remove failed studies older than their retention, and incomplete studies (cut short and never
        re-sent) quiet for longer than theirs; returns how many went."""
        now = time.time() if now is None else now
        gone = 0
        for reason in self.failed.glob("*/reason.json"):
            try:
                at = json.loads(reason.read_text())["at"]
            except (OSError, ValueError, KeyError):
                at = 0.0
            if now - at > failed_retention_s:
                shutil.rmtree(reason.parent, ignore_errors=True)
                gone += 1
        for folder in self.incomplete():
            try:
                quiet = now - self.state(folder).last_arrival
            except (OSError, ValueError):  # held before any instance was written: its markers' age
                quiet = now - max((m.stat().st_mtime for m in folder.glob("open-*")), default=0.0)
            if quiet > incomplete_retention_s:
                log.warning("incomplete study removed after its retention", extra={"study": folder.name})
                self.remove(folder)
                gone += 1
        return gone

    def counts(self) -> dict[str, int]:
        """Studies by state, for the metrics."""
        studies = list(self.studies.glob("*/study.json"))  # a study held before any instance is not counted
        waiting = 0  # tried and kept: the PACS or the service was away (attempts count failed sends only)
        for path in studies:
            try:
                waiting += StudyState.load(path).attempts > 0
            except (OSError, ValueError):
                continue
        return {"pending": len(studies), "incomplete": len(self.incomplete()), "waiting": waiting,
                "failed_kept": len(list(self.failed.glob("*/reason.json")))}
