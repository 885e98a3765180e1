"""Launch stage: train a list of branch specs in-process, as local subprocesses, or on SLURM.

Input: `BranchSpec`s (or paths to ``spec.json`` files). Output: each branch's ``final/`` folder.
Branches never talk to each other, so every mode is a plain job queue; a re-launch resumes each
unfinished branch from its last checkpoint and skips finished ones. A branch with
``procs_per_branch`` N > 1 is N processes in every mode: ``torchrun`` (sequential and local) or
one submitit job of N tasks (slurm).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from merit_lab.jobs import JobFailedError, LocalJob, module_command, run_local, run_submitit
from merit_lab.training.branch_log import MANIFEST
from merit_lab.training.distributed import (
    export_submitit_env,
    finish_process_group,
    torchrun_command,
)
from merit_lab.training.spec import BranchSpec, write_spec
from merit_lab.training.trainer import train_branch, train_branch_from_file

__all__ = ["BRANCH_JOB", "BranchFailedError", "branch_job_name", "launch_branches"]

MODES = ("sequential", "local", "slurm")
LOG_NAME = "train.log"  # a subprocess's stdout + stderr, in its branch folder (appended)
BRANCH_JOB = "merit-branch"  # a branch's submitit job name (`merit-lab plan` lists the same jobs)


def branch_job_name(name: str) -> str:
    """How a branch is named in job lists and failure messages."""
    return f"branch {name!r}"


class BranchFailedError(JobFailedError):
    """One or more branches failed; the message holds each one's exit status and log tail."""


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


def _local_job(spec: BranchSpec, path: Path) -> LocalJob:
    """``python -m merit_lab.training.trainer SPEC``, or torchrun of N of them for an N-process
    branch."""
    n = spec.train.procs_per_branch
    command = (
        torchrun_command(path, n) if n > 1 else module_command("merit_lab.training.trainer", path)
    )
    return LocalJob(branch_job_name(spec.name), command, Path(spec.output_dir) / LOG_NAME, n)


def _run_local(
    todo: list[tuple[BranchSpec, Path]],
    *,
    n_procs: int | None,
    gpus: Sequence[int] | None,
    echo: bool = False,
) -> None:
    """The branches as subprocesses in slots (`jobs.run_local`): an N-process branch takes N
    free GPUs, or one CPU slot whose cores its N processes share. CPU-only specs get no GPU."""
    jobs = [_local_job(s, p) for s, p in todo]
    cuda = any(s.device != "cpu" for s, _ in todo)
    run_local(jobs, n_procs=n_procs, gpus=gpus, echo=echo, use_gpus=cuda, error=BranchFailedError)


def _train_task(path: str) -> Path:
    """One submitit task: one process of a branch (its rank from the job's task id)."""
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        export_submitit_env()
    final = train_branch_from_file(path)
    finish_process_group()
    return final


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
            running ``python -m merit_lab.training.trainer SPEC``), or "slurm" (submitit jobs).
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
    finished = [(Path(s.output_dir) / "final" / MANIFEST).is_file() for s, _ in resolved]
    todo = [item for item, done in zip(resolved, finished, strict=True) if not done]
    for (spec, _), done in zip(resolved, finished, strict=True):
        if done and not spec.keep_checkpoints:  # left by a kill between final/ and their removal
            shutil.rmtree(Path(spec.output_dir) / "checkpoints", ignore_errors=True)
    if mode == "sequential":
        for spec, path in todo:  # an N-process branch: torchrun, its output echoed here
            if spec.train.procs_per_branch > 1:
                _run_local([(spec, path)], n_procs=None, gpus=None, echo=True)
            else:
                train_branch(spec)
    elif mode == "local":
        _run_local(todo, n_procs=n_procs, gpus=gpus)
    elif todo:
        folder = executor_folder or Path(resolved[0][0].output_dir).parent / "submitit"
        run_submitit(
            _train_task,
            [str(p) for _, p in todo],
            names=[branch_job_name(s.name) for s, _ in todo],
            slurm=slurm or {},
            folder=Path(folder),
            job_name=BRANCH_JOB,
            widths=[s.train.procs_per_branch for s, _ in todo],
            error=BranchFailedError,
        )
    return finals
