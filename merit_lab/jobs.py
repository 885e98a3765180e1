"""The job queue under every launcher: local subprocesses in slots, or submitit (SLURM) jobs,
and the leases those jobs hold on their run.

Input: jobs, each a command (``python -m MODULE JOB``, or torchrun of N of them) or a function of
one job file, with a log file and a width (the processes it runs). Output: the jobs run; the
failures collected and raised together, each with its log tail. Branch training
(`merit_lab.training.launch`) and the gradient workers (`merit_lab.gradients.workers`) both run on
it, so every mode means the same for both. Inside `job_leases` each job holds a lease file
(`hold_lease`) while it runs, so that a runner started after the one that launched it (which was
killed) waits for it instead of sweeping its temp entries or training its unit a second time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from merit_lab.io import atomic_write_json

__all__ = [
    "LEASE_BEAT_S",
    "LEASE_DIR",
    "LEASE_STALE_S",
    "JobFailedError",
    "LocalJob",
    "hold_lease",
    "job_leases",
    "live_leases",
    "log_tail",
    "module_command",
    "run_local",
    "run_submitit",
    "submitit_arrays",
    "wait_for_leases",
]

log = logging.getLogger(__name__)

TAIL_LINES = 30
# Submitit's local executor kills jobs after 2 minutes unless told otherwise.
SLURM_DEFAULTS = {"timeout_min": 24 * 60, "nodes": 1, "tasks_per_node": 1}


class JobFailedError(RuntimeError):
    """One or more jobs failed; the message holds each one's exit status and log tail."""


@dataclass(frozen=True)
class LocalJob:
    """One subprocess to run: its command, where its output goes, and how wide it is."""

    name: str  # in messages, e.g. "branch '0'" or "gradient worker 1"
    command: Sequence[str]
    log: Path  # stdout + stderr, appended
    width: int = 1  # processes it runs: that many GPUs, or that many shares of a CPU slot


def log_tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def module_command(module: str, job: str | os.PathLike) -> list[str]:
    """``python -m MODULE JOB`` with this Python."""
    return [sys.executable, "-m", module, str(job)]


def _copy_output(src, logf, echo) -> None:
    """Copy a child's output to its log file and to ``echo`` (this process's stderr)."""
    for chunk in iter(lambda: os.read(src.fileno(), 1 << 14), b""):
        logf.write(chunk)
        logf.flush()
        echo.write(chunk.decode(errors="replace"))
        echo.flush()


def run_local(
    jobs: Sequence[LocalJob],
    *,
    n_procs: int | None = None,
    gpus: Sequence[int] | None = None,
    use_gpus: bool = True,
    echo: bool = False,
    error: type[JobFailedError] = JobFailedError,
    poll_s: float = 0.2,
) -> None:
    """Run ``jobs`` as subprocesses, as many at a time as there are free slots.

    Slots are GPU ids (a job of width N takes N free GPUs, ``CUDA_VISIBLE_DEVICES``) or, without
    GPUs, ``n_procs`` CPU slots (a job of width N runs its N processes in one slot); the cores
    are split between all processes (oversubscribed BLAS/OpenMP threads thrash).

    Args:
        gpus: GPU ids; default every visible GPU when ``use_gpus`` and no ``n_procs``.
        echo: also copy each child's output to this process's stderr (live progress bars).
        error: the exception raised after the others finished when some failed.
    """
    if gpus is None and n_procs is None and use_gpus:
        import torch

        gpus = list(range(torch.cuda.device_count())) or None
    if gpus is not None and not gpus:
        raise ValueError("gpus=[] leaves no slot to run a job in")
    units = list(gpus or range(max(1, n_procs or 1)))  # GPU ids, or CPU slots
    wide = [f"{j.name} needs {j.width} GPUs" for j in jobs if gpus and j.width > len(units)]
    if wide:
        raise ValueError(f"{'; '.join(wide)}: more than the {len(units)} given")
    cores = os.cpu_count() or 1
    # The children import merit_lab from wherever this process did, installed or not.
    pkg_root = str(Path(__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)
    queue, free = list(jobs), list(units)
    running: list[tuple[subprocess.Popen, LocalJob, Any, list, threading.Thread | None]] = []
    failures = []
    try:
        while queue or running:
            while queue and len(free) >= (need := queue[0].width if gpus else 1):
                job = queue.pop(0)
                taken, free = free[:need], free[need:]
                threads = str(max(1, cores // (len(units) * (1 if gpus else job.width))))
                env = {
                    **os.environ,
                    "PYTHONPATH": pythonpath,
                    "OMP_NUM_THREADS": threads,
                    "MKL_NUM_THREADS": threads,
                }
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, taken))
                Path(job.log).parent.mkdir(parents=True, exist_ok=True)
                logf = open(job.log, "ab")  # noqa: SIM115  (closed when the child exits)
                out = subprocess.PIPE if echo else logf
                proc = subprocess.Popen(
                    _leased_command(job), env=env, stdout=out, stderr=subprocess.STDOUT
                )
                copier = None
                if echo:
                    copier = threading.Thread(
                        target=_copy_output, args=(proc.stdout, logf, sys.stderr), daemon=True
                    )
                    copier.start()
                running.append((proc, job, logf, taken, copier))
            time.sleep(poll_s)
            for item in list(running):
                proc, job, logf, taken, copier = item
                if proc.poll() is None:
                    continue
                if copier is not None:
                    copier.join()
                logf.close()
                running.remove(item)
                free += taken
                if proc.returncode != 0:
                    failures.append((job, proc.returncode))
    finally:  # on Ctrl-C (or any error here) stop our own children; they resume from their files
        for proc, _, logf, _, copier in running:
            proc.terminate()  # torchrun passes it on to its workers
            proc.wait()
            if copier is not None:
                copier.join(timeout=5)
            logf.close()
    if failures:
        raise error(
            "\n\n".join(
                f"{job.name} failed (exit status {code}); last lines of {job.log}:\n"
                f"{log_tail(job.log)}"
                for job, code in failures
            )
        )


def submitit_arrays(
    jobs: Sequence[Any],
    *,
    names: Sequence[str],
    slurm: Mapping[str, Any],
    job_name: str = "merit",
    widths: Sequence[int] | None = None,
) -> list[tuple[dict[str, Any], list[tuple[str, Any]]]]:
    """What `run_submitit` submits, without submitting: one array per job width, as (the
    executor's parameters, [(name, job)]). ``slurm`` describes one process; a width-N job gets
    N x ``tasks_per_node`` and ``gpus_per_node``. `merit-lab plan` prints it (a dry run)."""
    params = {**SLURM_DEFAULTS, "name": job_name, **slurm}
    params.pop("cluster", None)
    widths = list(widths or [1] * len(jobs))
    arrays = []
    for width in sorted(set(widths)):
        scaled = {k: width * params[k] for k in ("tasks_per_node", "gpus_per_node") if k in params}
        group = [(n, j) for n, j, w in zip(names, jobs, widths, strict=True) if w == width]
        arrays.append(({**params, **scaled}, group))
    return arrays


def run_submitit(
    fn: Callable[[str], Any],
    jobs: Sequence[str],
    *,
    names: Sequence[str],
    slurm: Mapping[str, Any],
    folder: Path,
    job_name: str = "merit",
    widths: Sequence[int] | None = None,
    error: type[JobFailedError] = JobFailedError,
) -> None:
    """``fn(job)`` for each job file as a submitit job (an array per width on SLURM);
    ``cluster="local"`` runs submitit's local executor, the same code without sbatch.

    ``slurm`` describes one process: a job of width N gets N x ``tasks_per_node`` and
    ``gpus_per_node`` (its processes find their rank in submitit's environment).
    """
    import submitit

    cluster = {**SLURM_DEFAULTS, **slurm}.get("cluster")  # None: SLURM if sbatch is there
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    handles = []
    for params, group in submitit_arrays(
        jobs, names=names, slurm=slurm, job_name=job_name, widths=widths
    ):
        executor.update_parameters(**params)
        with executor.batch():  # one array submission on SLURM
            leases = os.environ.get(LEASE_ENV)
            handles += [
                (n, executor.submit(_Leased(fn, leases, n) if leases else fn, str(j)))
                for n, j in group
            ]
    failures = []
    for name, handle in handles:
        try:
            handle.results()  # every task's: a job of width N has N
        except Exception as e:  # submitit wraps the worker's traceback in its own errors
            tail = "\n".join((handle.stderr() or "").splitlines()[-TAIL_LINES:])
            failures.append(f"{name} (job {handle.job_id}) failed: {e}\n{tail}")
    if failures:
        raise error("\n\n".join(failures))


# ------------------------------------------------------------------------------------ leases
LEASE_DIR = ".leases"  # in a run folder, beside its `.lock`: one file per running job
LEASE_ENV = "MERIT_LAB_LEASES"  # the lease folder of the jobs launched now (see `job_leases`)
LEASE_BEAT_S = 15.0  # a lease's heartbeat: its file's mtime is renewed this often
# A lease from another host counts as gone when its heartbeat is this old (a process on this
# host is checked by its pid instead, which needs no clock).
LEASE_STALE_S = 120.0


@contextlib.contextmanager
def job_leases(folder: str | os.PathLike) -> Iterator[Path]:
    """Every job `run_local` or `run_submitit` launches inside the block holds a lease in
    ``folder`` while it runs (the folder's path travels in ``MERIT_LAB_LEASES``, so the jobs'
    own processes see it, on this host or through sbatch)."""
    folder = Path(folder).resolve()
    old = os.environ.get(LEASE_ENV)
    os.environ[LEASE_ENV] = str(folder)
    try:
        yield folder
    finally:
        if old is None:
            os.environ.pop(LEASE_ENV, None)
        else:
            os.environ[LEASE_ENV] = old


def _lease_file(folder: Path, job: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", job).strip("_") or "job"
    return folder / f"{safe}.{socket.gethostname()}.{os.getpid()}.json"


@contextlib.contextmanager
def hold_lease(
    folder: str | os.PathLike, job: str, *, beat_s: float = LEASE_BEAT_S
) -> Iterator[Path]:
    """Hold a lease on a run for the block: ``folder/<job>.<host>.<pid>.json`` with
    ``{job, pid, host, started, runner}``, its mtime renewed every ``beat_s`` seconds by a
    thread, removed when the block ends (an exception too)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = _lease_file(folder, job)
    atomic_write_json(
        path,
        {
            "job": job,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "runner": os.getppid(),
        },
    )
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(beat_s):
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)

    thread = threading.Thread(target=beat, name=f"lease {job}", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join()
        path.unlink(missing_ok=True)


def _lease_alive(holder: dict[str, Any], mtime: float) -> bool:
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return time.time() - mtime < LEASE_STALE_S


def live_leases(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The leases in ``folder`` whose job still runs, each with its ``path``. A lease whose
    process is gone (its pid on this host; a heartbeat older than `LEASE_STALE_S` from another
    host) is removed, with a warning: that job was killed, and the runner now sweeps its temp
    entries and relaunches its unit."""
    folder = Path(folder)
    live = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            holder, mtime = json.loads(path.read_text(encoding="utf-8")), path.stat().st_mtime
        except FileNotFoundError:
            continue  # released meanwhile
        except ValueError:
            holder, mtime = {}, path.stat().st_mtime  # unreadable: judged by its heartbeat
        if _lease_alive(holder, mtime) if holder else time.time() - mtime < LEASE_STALE_S:
            live.append({**holder, "path": path})
        else:
            log.warning("%s: %s is no longer running; its lease is removed", path, holder)
            path.unlink(missing_ok=True)
    return live


def _describe(lease: dict[str, Any]) -> str:
    return (
        f"{lease.get('job', '?')} (pid {lease.get('pid')} on host {lease.get('host')!r}, "
        f"started {lease.get('started')}; lease {lease['path']})"
    )


def wait_for_leases(folder: str | os.PathLike, *, poll_s: float = 1.0) -> list[str]:
    """Wait until no job holds a live lease in ``folder`` (jobs launched by a runner that is
    gone finish their own unit, then release it); returns the jobs waited for. Each is named
    in a warning when the wait for it starts."""
    waited: list[str] = []
    while live := live_leases(folder):
        for lease in live:
            if _describe(lease) not in waited:
                waited.append(_describe(lease))
                log.warning(
                    "waiting for %s: a job of an earlier runner, still running; it is neither "
                    "swept nor launched again. If that process is gone for good, delete the "
                    "lease file",
                    _describe(lease),
                )
        time.sleep(poll_s)
    return waited


def _leased_command(job: LocalJob) -> list[str]:
    """``job.command`` run under a lease when `job_leases` is active (a small wrapper process,
    ``python -m merit_lab.jobs``, holds it while the command runs)."""
    folder = os.environ.get(LEASE_ENV)
    if not folder:
        return list(job.command)
    return [sys.executable, "-m", "merit_lab.jobs", folder, job.name, "--", *job.command]


@dataclass(frozen=True)
class _Leased:
    """``fn(job)`` under a lease: what a submitit job runs when `job_leases` is active."""

    fn: Callable[[str], Any]
    folder: str
    name: str

    def __call__(self, job: str) -> Any:
        with hold_lease(self.folder, self.name):
            return self.fn(job)


def _lease_main(argv: Sequence[str]) -> int:
    """``python -m merit_lab.jobs FOLDER JOB -- COMMAND...``: run COMMAND holding a lease; a
    SIGTERM (the runner's Ctrl-C) is passed on to it."""
    folder, name, sep, *command = argv
    if sep != "--" or not command:
        raise SystemExit("usage: python -m merit_lab.jobs FOLDER JOB -- COMMAND...")
    with hold_lease(folder, name):
        proc = subprocess.Popen(command)
        signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        return proc.wait()


if __name__ == "__main__":
    sys.exit(_lease_main(sys.argv[1:]))
