"""A job queue for self-contained job files: local subprocesses or submitit (SLURM) jobs.

Input: a module with a ``python -m MODULE JOB`` entry point and a function ``fn(JOB)`` that does
the same in process (branch training, gradient workers); the job files; a log file per job.
Output: the jobs run; failures are collected and raised together with each one's log tail.
The launchers of branches (`merit_lab.launch`) and gradient workers (`merit_lab.gradient_jobs`)
both run on it, so every mode means the same in both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["JobFailedError", "cpu_slots", "log_tail", "run_local", "run_submitit"]

TAIL_LINES = 30
# Submitit's local executor kills jobs after 2 minutes unless told otherwise.
SLURM_DEFAULTS = {"timeout_min": 24 * 60, "nodes": 1, "tasks_per_node": 1}


class JobFailedError(RuntimeError):
    """One or more jobs failed; the message holds each one's exit status and log tail."""


def log_tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def cpu_slots(n_procs: int | None, gpus: Sequence[int] | None) -> list[dict[str, str]]:
    """The environment of each slot: one GPU each (``CUDA_VISIBLE_DEVICES``), else ``n_procs``
    CPU processes; the cores are split between slots (oversubscribed BLAS threads thrash)."""
    if gpus is None and n_procs is None:
        import torch

        gpus = list(range(torch.cuda.device_count())) or None
    if gpus is not None and not gpus:
        raise ValueError("gpus=[] leaves no slot to run a job in")
    slots = [{"CUDA_VISIBLE_DEVICES": str(g)} for g in gpus or ()] or [{}] * max(1, n_procs or 1)
    threads = str(max(1, (os.cpu_count() or 1) // len(slots)))
    return [{**slot, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for slot in slots]


def run_local(
    module: str,
    jobs: Sequence[str],
    logs: Sequence[Path],
    *,
    names: Sequence[str],
    slots: Sequence[Mapping[str, str]],
    poll_s: float = 0.2,
) -> None:
    """``python -m MODULE JOB`` for each job, one per slot at a time; stdout + stderr appended
    to the job's log. On Ctrl-C (or any error here) our own children are stopped."""
    # The children import merit_lab from wherever this process did, installed or not.
    pkg_root = str(Path(__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)
    queue = list(zip(jobs, logs, names, strict=True))
    free = list(range(len(slots)))
    running: dict[int, tuple[subprocess.Popen, str, Path, Any]] = {}
    failures = []
    try:
        while queue or running:
            while queue and free:
                job, log, name = queue.pop(0)
                slot = free.pop(0)
                Path(log).parent.mkdir(parents=True, exist_ok=True)
                logf = open(log, "ab")  # noqa: SIM115  (closed when the child exits)
                env = {**os.environ, **slots[slot], "PYTHONPATH": pythonpath}
                cmd = [sys.executable, "-m", module, str(job)]
                proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
                running[slot] = (proc, name, Path(log), logf)
            time.sleep(poll_s)
            for slot, (proc, name, log, logf) in list(running.items()):
                if proc.poll() is None:
                    continue
                logf.close()
                del running[slot]
                free.append(slot)
                if proc.returncode != 0:
                    failures.append(
                        f"{name} failed (exit status {proc.returncode}); last lines of {log}:\n"
                        f"{log_tail(log)}"
                    )
    finally:
        for proc, _, _, logf in running.values():
            proc.terminate()
            proc.wait()
            logf.close()
    if failures:
        raise JobFailedError("\n\n".join(failures))


def run_submitit(
    fn: Callable[[str], Any],
    jobs: Sequence[str],
    *,
    names: Sequence[str],
    slurm: Mapping[str, Any],
    folder: Path,
    job_name: str = "merit",
) -> list[Any]:
    """One submitit job per job file (an array on SLURM); ``cluster="local"`` runs submitit's
    local executor, the same code without sbatch. Returns the results in order."""
    import submitit

    params = {**SLURM_DEFAULTS, "name": job_name, **slurm}
    cluster = params.pop("cluster", None)  # None: SLURM if sbatch is there, else local
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**params)
    with executor.batch():  # one array submission on SLURM
        handles = [executor.submit(fn, str(job)) for job in jobs]
    failures, results = [], []
    for name, handle in zip(names, handles, strict=True):
        try:
            results.append(handle.result())
        except Exception as e:  # submitit wraps the worker's traceback in its own errors
            tail = "\n".join((handle.stderr() or "").splitlines()[-TAIL_LINES:])
            failures.append(f"{name} (job {handle.job_id}) failed: {e}\n{tail}")
    if failures:
        raise JobFailedError("\n\n".join(failures))
    return results
