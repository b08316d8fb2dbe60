"""Tuning-log files: locations, validation, the work-dir lock and ``meta.json``.

A log directory is a MetaSchedule ``JSONDatabase`` (``database_workload.json`` and
``database_tuning_record.json``, one JSON value per line, appended as records arrive) plus
attnforge's ``meta.json``.  Layout: ``tuning_logs/<target-tag>/<workload>/``.

Concurrency: one tuning job per directory.  :class:`WorkDirLock` creates ``.tune.lock``
exclusively (pid, host, start time); a second job gets :class:`TuningLockError` naming the
holder.  A lock left by a dead process on this host is taken over.  Interruption: records are
appended line by line, so Ctrl-C leaves whole lines; a torn last line (killed mid-write) is cut
off, with a warning, when a job resumes (:func:`repair_tail`).
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AttnforgeError

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
META_FILE = "meta.json"
LOCK_FILE = ".tune.lock"


class TuningError(AttnforgeError, ValueError):
    """A tuning job was given a bad argument or cannot run (names the argument)."""


class TuningLogError(TuningError):
    """A tuning log is missing, corrupt or truncated (names the file and line)."""


class TuningLockError(TuningError):
    """Another tuning job holds the log directory."""


class TuningLogWarning(UserWarning):
    """A tuning log does not (fully) apply: other target, changed IR, repaired tail."""


def repo_log_root() -> Path:
    """``tuning_logs/`` of this checkout (override with ``ATTNFORGE_TUNING_LOGS``)."""
    env = os.environ.get("ATTNFORGE_TUNING_LOGS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "tuning_logs"


def default_log_dir(target, workload: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<target-tag>/<workload>/``; ``root`` defaults to :func:`repo_log_root`."""
    from .target import parse_target, target_tag

    if not workload or any(c in workload for c in "/\\") or workload.startswith("."):
        raise TuningError(f"workload name {workload!r} must be a plain directory name")
    return Path(root or repo_log_root()) / target_tag(parse_target(target)) / workload


def find_log_dirs(path: str | os.PathLike) -> list[Path]:
    """``path`` itself if it holds a database, else every database directory below it."""
    p = Path(path)
    if not p.exists():
        raise TuningLogError(f"tuning log {str(p)!r} does not exist")
    if (p / WORKLOAD_FILE).exists() or (p / RECORD_FILE).exists():
        return [p]
    found = sorted({f.parent for f in p.rglob(WORKLOAD_FILE)})
    if not found:
        raise TuningLogError(f"no MetaSchedule database ({WORKLOAD_FILE}, {RECORD_FILE}) in "
                             f"{str(p)!r} or below it")
    return found


def _read_lines(path: Path) -> list[tuple[int, object]]:
    try:
        text = path.read_text()
    except OSError as e:
        raise TuningLogError(f"cannot read tuning log {str(path)!r}: {e}") from e
    out = []
    lines = text.split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            kind = "truncated" if i >= len(lines) - 1 and not text.endswith("\n") else "corrupt"
            raise TuningLogError(f"tuning log {str(path)!r} is {kind} at line {i} ({e.msg}); "
                                 "delete the file or re-run `attnforge tune` into a fresh "
                                 "work dir") from e
    return out


@dataclass
class LogContents:
    """Parsed, validated JSONDatabase files of one directory."""

    dir: Path
    workloads: list[list] = field(default_factory=list)  # [shash, b64 IRModule]
    records: list[tuple[int, list]] = field(default_factory=list)  # (workload idx, record)

    def record_target(self, rec: list) -> dict:
        t = rec[2] if len(rec) > 2 else None
        return t if isinstance(t, dict) else {}


def read_log(path: str | os.PathLike) -> LogContents:
    """Parse and check one database directory; :class:`TuningLogError` names bad files."""
    d = Path(path)
    wpath, rpath = d / WORKLOAD_FILE, d / RECORD_FILE
    for f in (wpath, rpath):
        if not f.exists():
            raise TuningLogError(f"tuning log {str(f)!r} is missing")
    log = LogContents(d)
    for line, w in _read_lines(wpath):
        if not (isinstance(w, list) and len(w) == 2 and all(isinstance(x, str) for x in w)):
            raise TuningLogError(f"tuning log {str(wpath)!r} line {line}: not a workload entry "
                                 "[hash, module]")
        log.workloads.append(w)
    for line, r in _read_lines(rpath):
        ok = (isinstance(r, list) and len(r) == 2 and isinstance(r[0], int)
              and isinstance(r[1], list) and len(r[1]) >= 2)
        if not ok or not 0 <= r[0] < len(log.workloads):
            raise TuningLogError(f"tuning log {str(rpath)!r} line {line}: not a tuning record "
                                 f"of a workload listed in {WORKLOAD_FILE}")
        log.records.append((r[0], r[1]))
    return log


def repair_tail(work_dir: str | os.PathLike) -> int:
    """Cut a torn last line (a job killed mid-write) off both database files.

    Returns the number of lines dropped (a warning says so); corruption elsewhere raises.
    """
    dropped = 0
    for name in (WORKLOAD_FILE, RECORD_FILE):
        f = Path(work_dir) / name
        if not f.exists():
            continue
        text = f.read_text()
        if not text or text.endswith("\n"):
            continue
        head, _, last = text.rpartition("\n")
        try:
            json.loads(last)
            f.write_text(text + "\n")
        except json.JSONDecodeError:
            f.write_text(head + "\n" if head else "")
            dropped += 1
            warnings.warn(f"{f}: dropped a torn last line left by an interrupted job",
                          TuningLogWarning, stacklevel=2)
    read_log(work_dir) if (Path(work_dir) / WORKLOAD_FILE).exists() else None
    return dropped


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkDirLock:
    """Exclusive ``.tune.lock`` in a work dir; stale locks of dead local pids are taken over."""

    def __init__(self, work_dir: str | os.PathLike):
        self.path = Path(work_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text() or "{}")
                except (OSError, json.JSONDecodeError):
                    holder = {}
                pid, host = holder.get("pid"), holder.get("host")
                if host == info["host"] and isinstance(pid, int) and not _pid_alive(pid):
                    self.path.unlink(missing_ok=True)  # stale: its job died
                    continue
                raise TuningLockError(
                    f"work_dir {str(self.path.parent)!r} is being tuned by another job "
                    f"(pid {pid} on {host}); wait for it, use another work_dir, or delete "
                    f"{str(self.path)!r} if that job is gone") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(info, fh)
            self.held = True
            return
        raise TuningLockError(f"could not take the lock {str(self.path)!r}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_meta(work_dir: str | os.PathLike) -> dict:
    f = Path(work_dir) / META_FILE
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise TuningLogError(f"{str(f)!r} is corrupt ({e.msg}); delete it (the database files "
                             "are independent of it)") from e


def write_meta(work_dir: str | os.PathLike, meta: dict) -> Path:
    """Atomic write of ``meta.json`` (temp file + rename)."""
    f = Path(work_dir) / META_FILE
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, f)
    return f
