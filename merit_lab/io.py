"""Atomic file I/O shared by every stage: temp file (or folder) + rename, JSON helpers, hashing,
the temp entries' one naming pattern and their sweep, and the one-writer lock of a folder.

A killed process leaves either the old artifact or the new one, never half of one; what it was
writing stays behind as a temp entry (`is_temp_name`) until the folder's writer sweeps it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "TEMP_PATTERN",
    "LockHeldError",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_chunks",
    "atomic_write_json",
    "atomic_write_text",
    "current_umask",
    "entry_size",
    "find_temp",
    "hold_lock",
    "is_temp_name",
    "lock_holder",
    "read_json",
    "remove_temp",
    "sha256_file",
    "sweep_temp",
    "temp_leftovers_of",
    "temp_name",
]


# --------------------------------------------------------------------------------- temp entries
# ".<final name>.<8 random chars>.tmp" beside the final path: hidden, named for the artifact it
# becomes, and the names tempfile.mkstemp/mkdtemp gave before, so older leftovers match too.
TEMP_PATTERN = re.compile(r"^\.(?P<final>.+)\.[a-z0-9_]{8}\.tmp$")
_TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"
_UMASK_LOCK = threading.Lock()


def temp_name(final_name: str) -> str:
    """A fresh temp name for the artifact ``final_name``: ``.<final_name>.<8 random>.tmp``."""
    return f".{final_name}.{''.join(secrets.choice(_TOKEN_CHARS) for _ in range(8))}.tmp"


def is_temp_name(name: str, final_name: str | None = None) -> bool:
    """Whether ``name`` is a temp entry's (of the artifact ``final_name``, when given)."""
    m = TEMP_PATTERN.match(name)
    return m is not None and (final_name is None or m["final"] == final_name)


def _create_temp(final: Path, *, folder: bool) -> tuple[Path, int]:
    """Create a temp file (returns its open fd) or folder (fd -1) beside ``final``, exclusively.

    Created with 0o666 / 0o777 like any ``open()`` / ``mkdir()``, so the kernel applies the
    umask (or the folder's default ACL) exactly as for a normal write: mkstemp/mkdtemp would
    make them 0600/0700 whatever the umask.
    """
    for _ in range(100):
        tmp = final.parent / temp_name(final.name)
        try:
            if folder:
                os.mkdir(tmp, 0o777)
                return tmp, -1
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0)
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"{final.parent}: no free temp name for {final.name}")


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``,
    kernel ≥ 4.7); elsewhere set and restored under a lock (``os.umask`` is process-wide: for
    that instant 0o077, so a file another thread creates then is too private, never too open)."""
    with (
        contextlib.suppress(OSError, ValueError),
        open("/proc/self/status", encoding="ascii", errors="replace") as f,
    ):
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _widen_private_modes(root: Path) -> None:
    """Give ``root`` and every entry under it that is private (no group or other bit: mkstemp,
    mkdtemp, a copy of a private file) the bits a normal ``open()``/``mkdir()`` would: the
    owner's bits copied to group and other, less the umask (0600 → 0644 under umask 0022).
    Entries with any group or other bit are left as made (a default ACL may have set them)."""
    mask = current_umask()
    for dirpath, dirnames, filenames in os.walk(root):
        for p in [dirpath, *(os.path.join(dirpath, n) for n in [*dirnames, *filenames])]:
            st = os.lstat(p)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode) or mode & 0o077:
                continue
            own = (mode >> 6) & 0o7
            if (opened := mode | (((own << 3) | own) & ~mask & 0o077)) != mode:
                os.chmod(p, opened)


def find_temp(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """The temp entries in ``folder`` (and, ``recursive``, in its subfolders; a temp folder's
    inside is not searched: it goes as a whole). Sorted; [] when ``folder`` is absent."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        found += [Path(dirpath, n) for n in [*dirnames, *filenames] if is_temp_name(n)]
        dirnames[:] = [d for d in dirnames if recursive and not is_temp_name(d)]
    return sorted(found)


def temp_leftovers_of(final: str | os.PathLike) -> list[Path]:
    """The temp entries beside ``final`` that were on their way to become it."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    return sorted(p for p in final.parent.iterdir() if is_temp_name(p.name, final.name))


def entry_size(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder (0 for what vanished meanwhile)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        with contextlib.suppress(OSError):
            return path.lstat().st_size
        return 0
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for n in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, n)).st_size
    return total


def remove_temp(paths: list[Path]) -> list[Path]:
    """Delete temp entries (files or whole folders), logging each with its size; returns them.

    Only the one writer of the folder may call this: anyone else's temp entry may be a write in
    progress. Names that are not temp names are refused.
    """
    for p in paths:
        if not is_temp_name(p.name):
            raise ValueError(f"{p}: not a temp entry ({TEMP_PATTERN.pattern}); not removed")
        log.warning("removing %s (%d bytes), left by a killed write", p, entry_size(p))
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return list(paths)


def sweep_temp(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Remove the leftovers of killed writes in ``folder``: `remove_temp` over `find_temp`.

    Call it only as the folder's one writer, before writing (a branch folder at the start of
    its training; a run's folders under the run lock, see ``RunDir.sweep_temp``).
    """
    return remove_temp(find_temp(folder, recursive=recursive))


# ------------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``.

    The file gets the mode a plain ``open(path, "wb")`` of a new file would (umask applied).
    """
    return atomic_write_chunks(path, [data])


def atomic_write_chunks(path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> Path:
    """`atomic_write_bytes` of the concatenated ``chunks``, written as they come (a file larger
    than memory is streamed: each chunk may be made only when it is written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create_temp(path, folder=False)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
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
    Before the rename, the folder and every private entry in it get normal modes (see
    `_widen_private_modes`). An old ``final`` is renamed aside (to a temp name) before the new
    one takes its place and deleted after, so a kill leaves the old or the new folder in place,
    or, in the instant between the two renames, both as temp entries.

    Yields:
        The temporary folder to write into.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists")
    tmp, _ = _create_temp(final, folder=True)
    old = None
    try:
        yield tmp
        _widen_private_modes(tmp)
        if final.exists():
            old = final.parent / temp_name(final.name)
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not final.exists():
            os.replace(old, final)  # put the old folder back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
            path,
            holder["pid"],
            holder.get("started"),
            holder.get("command"),
        )
        if _read_holder(path) == holder:  # not replaced by another taker meanwhile
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def lock_holder(path: str | os.PathLike) -> dict[str, Any] | None:
    """Who holds a lock file (None: nobody): its JSON plus ``alive``, whether that process runs
    (None when it is on another host, or the file names no holder)."""
    path = Path(path)
    try:
        holder = _read_holder(path)
    except LockHeldError:
        return {"alive": None}
    if holder is None:
        return None
    same_host = holder.get("host") == socket.gethostname()
    return {**holder, "alive": _pid_alive(holder["pid"]) if same_host else None}


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
