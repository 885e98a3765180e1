"""Freed memory kept for reuse while a CPU forward/backward loop runs (glibc's malloc).

A forward/backward allocates its gradients afresh every call: one model's worth of float32 (the
weights' gradients before they are added into ``.grad``, the tied embedding's dense gradient,
the activations). glibc serves every block above its mmap threshold (128 KiB at first, raised
by the blocks freed up to 32 MiB) with a fresh ``mmap`` and returns it to the system on free,
so each call page-faults that memory in again, and the kernel zeroes every page. On this
project's 2-core machine (a Firecracker VM) a fresh 512 MiB fill took 0.44 s against 0.05 s
for the same fill reused, and a SmolLM2-135M forward/backward of 8 tokens 0.51-0.71 s against
0.34 s with freed memory kept (`docs/performance.md`, "freed memory kept"). On bare metal a
page fault is cheaper and the gain smaller (not measured there). The price is memory: the heap
holds on to its peak while the block runs (the SmolLM2 stage's peak RSS 1.09×,
`benchmarks/bench_cpu_memory.py`). The gradient stage and the per-example sketches run inside
it; training does not (4 SmolLM2 steps: no gain resolved).

`keep_freed_memory` tells glibc, for the block, to serve every block from its heap
(``M_MMAP_MAX`` 0) and to keep freed memory instead of trimming it (``M_TRIM_THRESHOLD``), so
the next call reuses pages already mapped. On leaving, glibc's defaults (65536 and 128 KiB) are
set again and the kept memory is handed back (``malloc_trim(0)``); glibc no longer raises its
mmap threshold by itself after any ``mallopt``, so it stays where it was. The values computed
are the same bits: only where the memory comes from changes.

It does nothing, and says so by yielding False, off the CPU, where the C library is not glibc
(``mallopt`` missing or refusing), or where the user tuned malloc themselves (a ``MALLOC_*_``
variable in the environment, or a preloaded allocator named in ``LD_PRELOAD``). Blocks nest:
only the outermost sets and restores.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Iterator

import torch

__all__ = ["keep_freed_memory"]

# glibc's <malloc.h> parameter numbers and their defaults (malloc/malloc.c)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_KEEP_TRIM_THRESHOLD = 2**31 - 1  # the largest a C int holds: no trim while the block runs
_USER_TUNING = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
)

_lock = threading.Lock()
_depth = 0
_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    """The process's glibc with ``mallopt`` and ``malloc_trim``, or None."""
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            lib.gnu_get_libc_version.restype = ctypes.c_char_p  # glibc only: musl has none
            lib.gnu_get_libc_version()
            _libc = lib
        except (OSError, AttributeError):
            return None
    return _libc


def _user_tuned() -> bool:
    preload = os.environ.get("LD_PRELOAD", "")
    return any(v in os.environ for v in _USER_TUNING) or any(
        lib in preload for lib in ("jemalloc", "tcmalloc", "mimalloc")
    )


@contextlib.contextmanager
def keep_freed_memory(device: str | torch.device = "cpu") -> Iterator[bool]:
    """For the block, glibc keeps freed memory for reuse (see the module's docstring); yields
    whether it does. ``device``: where the work runs; anything but the CPU leaves malloc alone."""
    libc = _glibc() if torch.device(device).type == "cpu" and not _user_tuned() else None
    kept = libc is not None and _enter(libc)
    try:
        yield kept
    finally:
        if kept:
            _leave(libc)


def _enter(libc: ctypes.CDLL) -> bool:
    global _depth
    with _lock:
        if _depth == 0:  # mallopt returns 1 on success; one that refuses gets the defaults back
            ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
            if not (ok and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD) == 1):
                _restore(libc)
                return False
        _depth += 1
        return True


def _leave(libc: ctypes.CDLL) -> None:
    global _depth
    with _lock:
        _depth -= 1
        if _depth == 0:
            _restore(libc)


def _restore(libc: ctypes.CDLL) -> None:
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
    libc.malloc_trim(0)
