"""Launch stage: train a list of branch specs in-process, as local subprocesses, or on SLURM.

Input: `BranchSpec`s (or paths to ``spec.json`` files). Output: each branch's ``final/`` folder.
Branches never talk to each other, so every mode is a plain job queue; a re-launch resumes each
unfinished branch from its last checkpoint and skips finished ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


def _run_local(
    todo: list[tuple[BranchSpec, Path]],
    *,
    n_procs: int | None,
    gpus: Sequence[int] | None,
    poll_s: float = 0.2,
) -> None:
    """A queue of ``python -m merit_lab.train SPEC`` subprocesses, one per slot."""
    if gpus is None and n_procs is None:
        import torch

        gpus = list(range(torch.cuda.device_count())) or None
    if gpus is not None and not gpus:
        raise ValueError("gpus=[] leaves no slot to run a branch in")
    slots = [{"CUDA_VISIBLE_DEVICES": str(g)} for g in gpus or ()] or [{}] * max(1, n_procs or 1)
    # Split the cores between the processes: oversubscribed BLAS/OpenMP threads thrash.
    threads = str(max(1, (os.cpu_count() or 1) // len(slots)))
    slots = [{**slot, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for slot in slots]
    # The children import merit_lab from wherever this process did, installed or not.
    pkg_root = str(Path(__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)
    queue = list(todo)
    free = list(range(len(slots)))
    running: dict[int, tuple[subprocess.Popen, BranchSpec, Any]] = {}
    failures = []
    try:
        while queue or running:
            while queue and free:
                spec, path = queue.pop(0)
                slot = free.pop(0)
                # held open for the child's lifetime, closed when it exits
                logf = open(Path(spec.output_dir) / LOG_NAME, "ab")  # noqa: SIM115
                env = {**os.environ, **slots[slot], "PYTHONPATH": pythonpath}
                cmd = [sys.executable, "-m", "merit_lab.train", str(path)]
                proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
                running[slot] = (proc, spec, logf)
            time.sleep(poll_s)
            for slot, (proc, spec, logf) in list(running.items()):
                if proc.poll() is None:
                    continue
                logf.close()
                del running[slot]
                free.append(slot)
                if proc.returncode != 0:
                    failures.append((spec, f"exit status {proc.returncode}"))
    finally:  # on Ctrl-C (or any error here) stop our own children; checkpoints let them resume
        for proc, _, logf in running.values():
            proc.terminate()
            proc.wait()
            logf.close()
    if failures:
        raise BranchFailedError(
            "\n\n".join(
                f"branch {s.name!r} failed ({why}); last lines of "
                f"{Path(s.output_dir) / LOG_NAME}:\n{_tail(Path(s.output_dir) / LOG_NAME)}"
                for s, why in failures
            )
        )


def _run_submitit(
    todo: list[tuple[BranchSpec, Path]], slurm: Mapping[str, Any], folder: Path
) -> None:
    """One submitit job per branch; ``cluster="local"`` runs the same code without sbatch."""
    import submitit

    params = {**_SLURM_DEFAULTS, **slurm}
    cluster = params.pop("cluster", None)  # None: SLURM if sbatch is there, else local
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**params)
    with executor.batch():  # one array submission on SLURM
        jobs = [executor.submit(train_branch_from_file, str(path)) for _, path in todo]
    failures = []
    for (spec, _), job in zip(todo, jobs, strict=True):
        try:
            job.result()
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
        n_procs: local mode without GPUs: branches at a time, each with cores // n_procs
            torch threads.
        gpus: local mode: GPU indices, one branch per GPU at a time (``CUDA_VISIBLE_DEVICES``).
            Default: every visible GPU, or one CPU process when there is none and no n_procs.
        slurm: submitit parameters, e.g. ``{"slurm_partition": "gpu", "gpus_per_node": 1,
            "timeout_min": 600}``; ``{"cluster": "local"}`` runs submitit's local executor.
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
        for spec, _ in todo:
            train_branch(spec)
    elif mode == "local":
        _run_local(todo, n_procs=n_procs, gpus=gpus)
    elif todo:
        folder = executor_folder or Path(resolved[0][0].output_dir).parent / "submitit"
        _run_submitit(todo, slurm or {}, Path(folder))
    return finals
