"""The job queue under every launcher: local subprocesses in slots, or submitit (SLURM) jobs.

Input: jobs, each a command (``python -m MODULE JOB``, or torchrun of N of them) or a function of
one job file, with a log file and a width (the processes it runs). Output: the jobs run; the
failures collected and raised together, each with its log tail. Branch training
(`merit_lab.training.launch`) and the gradient workers (`merit_lab.gradients.workers`) both run on
it, so
every mode means the same for both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["JobFailedError", "LocalJob", "log_tail", "module_command", "run_local", "run_submitit"]

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
                    list(job.command), env=env, stdout=out, stderr=subprocess.STDOUT
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

    params = {**SLURM_DEFAULTS, "name": job_name, **slurm}
    cluster = params.pop("cluster", None)  # None: SLURM if sbatch is there, else local
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    widths = list(widths or [1] * len(jobs))
    handles = []
    for width in sorted(set(widths)):
        scaled = {k: width * params[k] for k in ("tasks_per_node", "gpus_per_node") if k in params}
        executor.update_parameters(**{**params, **scaled})
        group = [(n, j) for n, j, w in zip(names, jobs, widths, strict=True) if w == width]
        with executor.batch():  # one array submission on SLURM
            handles += [(n, executor.submit(fn, str(j))) for n, j in group]
    failures = []
    for name, handle in handles:
        try:
            handle.results()  # every task's: a job of width N has N
        except Exception as e:  # submitit wraps the worker's traceback in its own errors
            tail = "\n".join((handle.stderr() or "").splitlines()[-TAIL_LINES:])
            failures.append(f"{name} (job {handle.job_id}) failed: {e}\n{tail}")
    if failures:
        raise error("\n\n".join(failures))
