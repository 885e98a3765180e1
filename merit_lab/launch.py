"""Launch stage: train a list of branch specs in-process, as local subprocesses, or on SLURM.

Input: `BranchSpec`s (or paths to ``spec.json`` files). Output: each branch's ``final/`` folder.
Branches never talk to each other, so every mode is a plain job queue; a re-launch resumes each
unfinished branch from its last checkpoint and skips finished ones. A branch with
``procs_per_branch`` N > 1 is N processes in every mode: ``torchrun`` (sequential and local) or
one submitit job of N tasks (slurm).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from merit_lab.distributed import export_submitit_env, finish_process_group, torchrun_command
from merit_lab.train import MANIFEST, BranchSpec, train_branch, train_branch_from_file, write_spec

__all__ = ["BranchFailedError", "launch_branches"]

MODES = ("sequential", "local", "slurm")
LOG_NAME = "train.log"  # a subprocess's stdout + stderr, in its branch folder (appended)
TAIL_LINES = 30
# Submitit's local executor kills jobs after 2 minutes unless told otherwise.
_SLURM_DEFAULTS = {"timeout_min": 24 * 60, "nodes": 1, "tasks_per_node": 1, "name": "merit-branch"}


class BranchFailedError(RuntimeError):
    """One or more branches failed; the message holds each one's exit status and log tail."""


def _tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def _resolve(specs: Sequence[BranchSpec | str | Path]) -> list[tuple[BranchSpec, Path]]:
    """Each spec with the ``spec.json`` a worker reads (written into its branch folder)."""
    out = []
    for item in specs:
        spec = item if isinstance(item, BranchSpec) else BranchSpec.load(item)
        out.append((spec, write_spec(spec)))
    names = [s.output_dir for s, _ in out]
    if len(set(map(os.path.abspath, names))) != len(names):
        raise ValueError(f"two branches share an output_dir: {names}")
    return out


def _command(spec: BranchSpec, path: Path) -> list[str]:
    """``python -m merit_lab.train SPEC``, or torchrun of N of them for an N-process branch."""
    if spec.procs_per_branch > 1:
        return torchrun_command(path, spec.procs_per_branch)
    return [sys.executable, "-m", "merit_lab.train", str(path)]


def _copy_output(src, logf, echo) -> None:
    """Copy a child's output to its log file and to ``echo`` (this process's stderr)."""
    for chunk in iter(lambda: os.read(src.fileno(), 1 << 14), b""):
        logf.write(chunk)
        logf.flush()
        echo.write(chunk.decode(errors="replace"))
        echo.flush()


def _run_local(
    todo: list[tuple[BranchSpec, Path]],
    *,
    n_procs: int | None,
    gpus: Sequence[int] | None,
    poll_s: float = 0.2,
    echo: bool = False,
) -> None:
    """A queue of ``python -m merit_lab.train SPEC`` subprocesses (``torchrun`` for N-process
    branches), in slots: one per GPU, or ``n_procs`` on the CPU.

    A branch of N processes takes N free GPUs (``CUDA_VISIBLE_DEVICES``); on the CPU it takes
    one slot and its N processes share that slot's cores. ``echo`` also copies each child's
    output to this process's stderr (the sequential mode's progress bars).
    """
    if gpus is None and n_procs is None and any(s.device != "cpu" for s, _ in todo):
        import torch

        gpus = list(range(torch.cuda.device_count())) or None
    if gpus is not None and not gpus:
        raise ValueError("gpus=[] leaves no slot to run a branch in")
    units = list(gpus or range(max(1, n_procs or 1)))  # GPU ids, or CPU slots
    wide = [s.name for s, _ in todo if gpus and s.procs_per_branch > len(units)]
    if wide:
        raise ValueError(f"branches {wide} need more processes than the {len(units)} GPUs given")
    cores = os.cpu_count() or 1
    # The children import merit_lab from wherever this process did, installed or not.
    pkg_root = str(Path(__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)
    queue = list(todo)
    free = list(units)
    running: list[tuple[subprocess.Popen, BranchSpec, Any, list, threading.Thread | None]] = []
    failures = []
    try:
        while queue or running:
            while queue and len(free) >= (need := queue[0][0].procs_per_branch if gpus else 1):
                spec, path = queue.pop(0)
                taken, free = free[:need], free[need:]
                # Split the cores between the processes: oversubscribed BLAS/OpenMP threads thrash.
                per_proc = len(units) if gpus else len(units) * spec.procs_per_branch
                threads = str(max(1, cores // per_proc))
                env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": threads,
                       "MKL_NUM_THREADS": threads}  # fmt: skip
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, taken))
                # held open for the child's lifetime, closed when it exits
                logf = open(Path(spec.output_dir) / LOG_NAME, "ab")  # noqa: SIM115
                out = subprocess.PIPE if echo else logf
                cmd = _command(spec, path)
                proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
                copier = None
                if echo:
                    copier = threading.Thread(
                        target=_copy_output, args=(proc.stdout, logf, sys.stderr), daemon=True
                    )
                    copier.start()
                running.append((proc, spec, logf, taken, copier))
            time.sleep(poll_s)
            for item in list(running):
                proc, spec, logf, taken, copier = item
                if proc.poll() is None:
                    continue
                if copier is not None:
                    copier.join()
                logf.close()
                running.remove(item)
                free += taken
                if proc.returncode != 0:
                    failures.append((spec, f"exit status {proc.returncode}"))
    finally:  # on Ctrl-C (or any error here) stop our own children; checkpoints let them resume
        for proc, _, logf, _, copier in running:
            proc.terminate()  # torchrun passes it on to its workers
            proc.wait()
            if copier is not None:
                copier.join(timeout=5)
            logf.close()
    if failures:
        raise BranchFailedError(
            "\n\n".join(
                f"branch {s.name!r} failed ({why}); last lines of "
                f"{Path(s.output_dir) / LOG_NAME}:\n{_tail(Path(s.output_dir) / LOG_NAME)}"
                for s, why in failures
            )
        )


def _train_task(path: str) -> Path:
    """One submitit task: one process of a branch (its rank from the job's task id)."""
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        export_submitit_env()
    final = train_branch_from_file(path)
    finish_process_group()
    return final


def _run_submitit(
    todo: list[tuple[BranchSpec, Path]], slurm: Mapping[str, Any], folder: Path
) -> None:
    """One submitit job per branch; ``cluster="local"`` runs the same code without sbatch."""
    import submitit

    params = {**_SLURM_DEFAULTS, **slurm}
    cluster = params.pop("cluster", None)  # None: SLURM if sbatch is there, else local
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    jobs = []
    # One job array per process count: the parameters describe one process of a branch, so an
    # N-process branch is one job of N x the tasks (and GPUs), its ranks from submitit's env.
    for procs in sorted({s.procs_per_branch for s, _ in todo}):
        scaled = {k: procs * params[k] for k in ("tasks_per_node", "gpus_per_node") if k in params}
        executor.update_parameters(**{**params, **scaled})
        group = [(s, p) for s, p in todo if s.procs_per_branch == procs]
        with executor.batch():  # one array submission on SLURM
            jobs += [(s, executor.submit(_train_task, str(p))) for s, p in group]
    failures = []
    for spec, job in jobs:
        try:
            job.results()
        except Exception as e:  # submitit wraps the worker's traceback in its own errors
            stderr = job.stderr() or ""
            tail = "\n".join(stderr.splitlines()[-TAIL_LINES:])
            failures.append(f"branch {spec.name!r} (job {job.job_id}) failed: {e}\n{tail}")
    if failures:
        raise BranchFailedError("\n\n".join(failures))


def launch_branches(
    specs: Sequence[BranchSpec | str | Path],
    *,
    mode: str = "sequential",
    n_procs: int | None = None,
    gpus: Sequence[int] | None = None,
    slurm: Mapping[str, Any] | None = None,
    executor_folder: str | Path | None = None,
) -> list[Path]:
    """Train every branch and return their ``final/`` folders, in the order given.

    Args:
        specs: branch specs, or paths to ``spec.json`` files.
        mode: "sequential" (in this process, one after the other), "local" (subprocesses
            running ``python -m merit_lab.train SPEC``), or "slurm" (submitit jobs).
        n_procs: local mode without GPUs: branches at a time, each process with
            cores // (n_procs x procs_per_branch) torch threads.
        gpus: local mode: GPU indices, one per process of a branch at a time
            (``CUDA_VISIBLE_DEVICES``). Default: every visible GPU, or one CPU slot when there
            is none and no n_procs. Sequential mode runs an N-process branch with these
            defaults.
        slurm: submitit parameters, e.g. ``{"slurm_partition": "gpu", "gpus_per_node": 1,
            "timeout_min": 600}``; ``{"cluster": "local"}`` runs submitit's local executor. They
            describe one process: an N-process branch gets N x ``tasks_per_node`` and
            ``gpus_per_node``.
        executor_folder: where submitit keeps its pickles and logs (default: ``submitit/``
            beside the first branch folder).

    Raises:
        BranchFailedError: after the others finished, naming each failed branch with its log tail.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    resolved = _resolve(specs)
    finals = [Path(s.output_dir) / "final" for s, _ in resolved]
    # Finished branches cost nothing; skipping them here also saves a process start each.
    todo = [(s, p) for s, p in resolved if not (Path(s.output_dir) / "final" / MANIFEST).is_file()]
    if mode == "sequential":
        for spec, path in todo:  # an N-process branch: torchrun, its output echoed here
            if spec.procs_per_branch > 1:
                _run_local([(spec, path)], n_procs=None, gpus=None, echo=True)
            else:
                train_branch(spec)
    elif mode == "local":
        _run_local(todo, n_procs=n_procs, gpus=gpus)
    elif todo:
        folder = executor_folder or Path(resolved[0][0].output_dir).parent / "submitit"
        _run_submitit(todo, slurm or {}, Path(folder))
    return finals
