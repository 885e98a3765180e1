"""Atomic file I/O shared by every stage: temp file (or folder) + rename, JSON helpers, hashing,
and the one-writer lock of a folder.

A killed process leaves either the old artifact or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "LockHeldError",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "hold_lock",
    "read_json",
    "sha256_file",
]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON atomically (keys kept in insertion order, NaN refused)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; the error names the file when it is malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from e


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temp name and rename it to ``final`` only if the block succeeds.

    On any exception the temp folder is removed and ``final`` is untouched (absent if it was).

    Yields:
        The temporary folder to write into.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists")
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class LockHeldError(FileExistsError):
    """Another process holds the lock: the message names it (pid, host, since, command)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _read_holder(path: Path) -> dict[str, Any] | None:
    """The lock's holder; None when the file vanished. A file still being written (created but
    not yet filled) is re-read for up to a second before it is called malformed."""
    for _ in range(10):
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
                return holder
        except FileNotFoundError:
            return None
        except ValueError:
            pass
        time.sleep(0.1)
    raise LockHeldError(
        f"{path}: a lock file that names no holder; if no merit-lab process is writing "
        f"{path.parent}, delete {path}"
    )


def _held_message(path: Path, holder: dict[str, Any], why: str) -> str:
    return (
        f"{path.parent} is being written by pid {holder['pid']} on host {holder.get('host')!r} "
        f"since {holder.get('started')} (command: {holder.get('command')!r}). {why}"
    )


def _acquire(path: Path, me: dict[str, Any]) -> bool:
    """Create the lock file holding ``me``; False when this process already holds it."""
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            return True
        if holder is None:  # released between our open and our read
            continue
        if holder.get("host") != me["host"]:
            raise LockHeldError(
                _held_message(
                    path,
                    holder,
                    "That host's process cannot be checked from here, so the lock is not taken "
                    f"over: wait for it to finish, or, if that host or its process is gone, "
                    f"delete {path}.",
                )
            )
        if holder["pid"] == me["pid"]:
            return False
        if _pid_alive(holder["pid"]):
            raise LockHeldError(
                _held_message(
                    path,
                    holder,
                    f"Wait for it to finish, or stop it (kill {holder['pid']}) and run again.",
                )
            )
        log.warning(
            "%s: taking over the lock of pid %s (started %s, %r), which is no longer running",
            path, holder["pid"], holder.get("started"), holder.get("command"),
        )  # fmt: skip
        if _read_holder(path) == holder:  # not replaced by another taker meanwhile
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike, *, command: str | None = None) -> Iterator[Path]:
    """Hold ``path`` as a lock file for the block: one writer per folder at a time.

    The file holds JSON ``{pid, host, started, command}`` and is created with ``O_CREAT|O_EXCL``,
    so two processes cannot both take it; it is removed when the block ends, by an exception
    too. A lock this process already holds is entered again (nested calls; the outermost block
    removes it). A lock whose process is dead on this host is taken over with a warning; one
    from another host never is (its process cannot be checked from here).

    Args:
        command: what the holder is doing, shown to a refused writer (default: ``sys.argv``).

    Raises:
        LockHeldError: a live process (or one on another host) holds the lock.
    """
    path = Path(path)
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command if command is not None else shlex.join(sys.argv),
    }
    if not _acquire(path, me):
        yield path
        return
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError, LockHeldError):
            if _read_holder(path) == me:  # never remove a lock another process took over
                path.unlink()
