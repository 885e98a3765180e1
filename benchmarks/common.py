"""Shared harness of the benchmarks: figures with targets, a printed table, JSON, peak RSS.

Every benchmark module exposes ``run(quick: bool = False) -> Results`` and ends with
``bench_main(run, __doc__)``, so it runs alone (``python -m benchmarks.bench_x [--quick]``) or
inside ``python -m benchmarks.run_all`` (``make bench``). A figure is one number with its unit
and, where the issue sets one, its target; the table prints them side by side and says whether
each target is met.

Peak memory is measured in a fresh child process (``spawn``, or a separate command), as the
child's ``ru_maxrss`` minus its resident size before the measured work, so the parent's memory
and the interpreter's imports never count.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CommandMemory",
    "Figure",
    "Results",
    "bench_main",
    "cached_fraction",
    "command_memory",
    "command_peak",
    "drop_page_cache",
    "in_child",
    "machine",
    "peak_rss",
    "print_table",
    "rel_slope_spread",
    "reset_peak_rss",
    "write_json",
]

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda v, t: v <= t,
    ">=": lambda v, t: v >= t,
    "<": lambda v, t: v < t,
    ">": lambda v, t: v > t,
}


@dataclass
class Figure:
    """One measured number, with its target when the issue sets one."""

    section: str
    name: str
    value: float
    unit: str = ""
    target: tuple[str, float] | None = None  # (op, threshold), e.g. (">=", 0.9)
    note: str = ""
    skipped: bool = False  # not measured in this run; ``note`` says why

    @property
    def ok(self) -> bool | None:
        if self.skipped:
            return None
        if self.target is None or not np.isfinite(self.value):
            return None if self.target is None else False
        op, thr = self.target
        return _OPS[op](self.value, thr)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _fmt(v: float, unit: str) -> str:
    if not np.isfinite(v):
        return str(v)
    if unit == "%":
        return f"{v:.2f}%"
    if unit == "×":
        return f"{v:.3g}×" if abs(v) < 1000 else f"{v:,.0f}×"
    a = abs(v)
    s = f"{v:,.0f}" if a >= 1000 else f"{v:.4g}"
    return f"{s} {unit}".rstrip()


@dataclass
class Results:
    """The figures of one benchmark, plus raw measurements that go into the JSON only."""

    bench: str
    figures: list[Figure] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def add(
        self,
        section: str,
        name: str,
        value: float,
        unit: str = "",
        *,
        target: tuple[str, float] | None = None,
        note: str = "",
    ) -> Figure:
        if target is not None and target[0] not in _OPS:
            raise ValueError(f"unknown target op {target[0]!r}")
        fig = Figure(section, name, float(value), unit, target, note)
        self.figures.append(fig)
        return fig

    def skip(self, section: str, name: str, reason: str) -> Figure:
        """Record a figure this run could not measure (e.g. a peer tool that failed to install)."""
        fig = Figure(section, name, float("nan"), note=reason, skipped=True)
        self.figures.append(fig)
        return fig

    def to_dict(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "seconds": round(self.seconds, 2),
            "figures": [f.to_dict() for f in self.figures],
            "raw": self.raw,
        }

    def write_json(self, path: str | os.PathLike) -> Path:
        return write_json(path, {"machine": machine(), "results": [self.to_dict()]})


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomic JSON write (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def print_table(results: Sequence[Results], file=None) -> None:
    """One table of every figure: section, figure, value, target, met?"""
    file = file or sys.stdout
    rows = [("section", "figure", "value", "target", "")]
    for res in results:
        for f in res.figures:
            tgt = "" if f.target is None else f"{f.target[0]} {_fmt(f.target[1], f.unit)}"
            mark = {True: "ok", False: "MISSED", None: ""}[f.ok]
            value = "skipped" if f.skipped else _fmt(f.value, f.unit)
            rows.append((f.section, f.name, value, tgt, mark))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    widths[1] = min(widths[1], 64)
    line = "  ".join("-" * w for w in widths)
    print(line, file=file)
    for i, r in enumerate(rows):
        cells = [
            r[0].ljust(widths[0]),
            r[1][: widths[1]].ljust(widths[1]),
            r[2].rjust(widths[2]),
            r[3].ljust(widths[3]),
            r[4],
        ]
        print("  ".join(cells).rstrip(), file=file)
        if i == 0:
            print(line, file=file)
    print(line, file=file)
    notes = [(f.name, f.note) for res in results for f in res.figures if f.note]
    for name, note in notes:
        print(f"  * {name}: {note}", file=file)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field_name} in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS and return that RSS in bytes.

    Linux ≥ 4.0 (``echo 5 > /proc/self/clear_refs``); `peak_rss` then reads the new peak.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def peak_rss() -> int:
    """This process's peak RSS (VmHWM) in bytes since start or the last `reset_peak_rss`."""
    return _status_kb("VmHWM")


def _child_entry(fn: Callable[..., Any], args: tuple, kwargs: dict, q: mp.Queue) -> None:
    try:
        base = reset_peak_rss()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
        q.put(("ok", out, seconds, peak_rss() - base))
    except BaseException as e:  # report any failure to the parent instead of hanging it
        q.put(("error", f"{type(e).__name__}: {e}", 0.0, 0))


def in_child(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float, int]:
    """Run ``fn(*args, **kwargs)`` in a fresh spawned process.

    Returns ``(fn's return value, seconds, peak RSS bytes above the child's RSS at the start
    of the call)``. ``fn`` must be importable (a module-level function) and its result
    picklable. The peak is the child's VmHWM, reset just before the call, so neither the
    child's imports nor the parent's memory count. (``ru_maxrss`` would not do: Linux carries
    the parent's resident size at fork into the child's, across exec.)
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_entry, args=(fn, args, kwargs, q))
    p.start()
    status, out, seconds, peak = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(f"benchmark child failed: {out}")
    return out, seconds, peak


# A small intermediate process runs the command and reports its ru_maxrss: the command then
# starts from this wrapper's few MB rather than from the (large) benchmark process, whose
# resident size Linux would otherwise carry into the command's ru_maxrss.
_WRAPPER = """
import os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def command_peak(
    cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None
) -> tuple[float, int, str]:
    """Run a command; return (wall seconds, its peak RSS in bytes, its combined output).

    The peak is the command's own ru_maxrss (its main process; the command must do its work
    there, as mergekit does). Raises with the output's tail when the command fails.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "maxrss"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", _WRAPPER, str(report), *cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            text=True,
        )
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}")
        return seconds, int(report.read_text()), proc.stdout


# Samples /proc/<pid>/status of the command every ``interval`` s while it runs: the peaks of its
# anonymous (RssAnon) and file-backed (RssFile: mapped files, e.g. safetensors read through
# mmap, and the shared libraries) resident pages, which ru_maxrss (their sum at its peak) lumps
# together. The command's own wall time is measured here, around spawn and reap.
_SAMPLER = """
import json, os, sys, time
report, interval, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
fields = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")
peak, n = dict.fromkeys(fields, 0), 0
t0 = time.perf_counter()
pid = os.posix_spawnp(cmd[0], cmd, os.environ)
status_path = f"/proc/{pid}/status"
while True:
    try:
        with open(status_path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in peak:
                    peak[key] = max(peak[key], int(value.split()[0]) * 1024)
        n += 1
    except (OSError, ValueError, IndexError):  # exiting: a zombie has no memory fields
        pass
    done, status, usage = os.wait4(pid, os.WNOHANG)
    if done:
        break
    time.sleep(interval)
seconds = time.perf_counter() - t0
with open(report, "w") as f:
    json.dump({"seconds": seconds, "ru_maxrss": usage.ru_maxrss * 1024, "samples": n,
               "peaks": peak}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@dataclass(frozen=True)
class CommandMemory:
    """One command's wall time and memory, split by kind (see `command_memory`)."""

    seconds: float  # spawn to reap, measured beside the command (no wrapper start-up)
    max_rss: int  # ru_maxrss: the exact peak of anonymous + file-backed + shmem resident bytes
    peak_anon: int  # highest RssAnon sampled: heap, tensors, malloc'd buffers
    peak_file: int  # highest RssFile sampled: mapped files (inputs read by mmap, libraries)
    peak_shmem: int  # highest RssShmem sampled
    peak_rss_sampled: int  # highest VmRSS sampled (≤ max_rss; close when sampling kept up)
    samples: int
    output: str


def command_memory(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    interval: float = 0.005,
) -> CommandMemory:
    """Run a command; return its wall time and peak RSS split into anonymous and file-backed.

    A small wrapper process spawns the command and reads its ``/proc/<pid>/status`` every
    ``interval`` seconds (RssAnon, RssFile, RssShmem: counters, cheap to read, unlike
    ``smaps_rollup`` which walks every mapping), then reaps it for its exact ``ru_maxrss``. The
    split peaks are sampled, so a spike shorter than ``interval`` can be missed:
    ``peak_rss_sampled`` against ``max_rss`` shows how close the sampling came. Only the
    command's own process is followed (mergekit and our merge do their work in it). Raises
    with the output's tail when the command fails. Linux only.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "memory.json"
        proc = subprocess.run(
            [sys.executable, "-c", _SAMPLER, str(report), str(interval), *cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}")
        r = json.loads(report.read_text())
    p = r["peaks"]
    return CommandMemory(
        seconds=r["seconds"],
        max_rss=r["ru_maxrss"],
        peak_anon=p["RssAnon"],
        peak_file=p["RssFile"],
        peak_shmem=p["RssShmem"],
        peak_rss_sampled=p["VmRSS"],
        samples=r["samples"],
        output=proc.stdout,
    )


def drop_page_cache(paths: Sequence[str | os.PathLike]) -> None:
    """Evict ``paths`` from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``), no root needed.

    The kernel drops only clean pages no process has mapped, so written files are fsynced first;
    `cached_fraction` tells whether it worked (tmpfs, for one, keeps its pages).
    """
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(paths: Sequence[str | os.PathLike]) -> float:
    """Share of the pages of ``paths`` now in the page cache (``mincore`` on a mapping that is
    never touched, so measuring faults nothing in). Linux only."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    resident = total = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        n_pages = (size + page - 1) // page
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap of {p} failed")
            try:
                vec = (ctypes.c_ubyte * n_pages)()
                if libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore of {p} failed")
                resident += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
        total += n_pages
    return resident / total if total else 0.0


def rel_slope_spread(xs: Sequence[float], ys: Sequence[float]) -> float:
    """How far y/x strays from constant: (max - min) / mean of y/x. 0 for perfectly linear."""
    r = np.asarray(ys, dtype=float) / np.asarray(xs, dtype=float)
    return float((r.max() - r.min()) / r.mean())


def bench_main(run: Callable[..., Results], doc: str | None) -> None:
    """Standalone entry point shared by the bench modules: --quick, --out, prints the table."""
    import argparse

    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = run(quick=args.quick)
    res.seconds = time.perf_counter() - t0
    print_table([res])
    if args.out:
        res.write_json(args.out)
