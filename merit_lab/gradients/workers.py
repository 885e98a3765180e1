"""The gradient stage across workers: the sources shared among processes, GPUs or SLURM jobs.

Input: one `GradientJob` per worker (``<out_dir>/workers/<i>.job.json``): θ0, the mixture's load
arguments, the sources this worker computes and every setting of the bank. A worker
(``python -m merit_lab.gradients.workers JOB``, or `run_job`) runs `estimate_gradients` on its
sources and writes one part per finished source into ``<out_dir>/parts/``, the same files the
single-process stage writes, then ``<i>.done.json`` (its bank info and tokens/s). Output: the bank,
assembled by `assemble_bank` once every source has a current part.

Every row depends only on θ0, the source's examples and the seeded sketch, never on the worker,
so a bank from N workers equals the single-process bank (bitwise on the CPU at the same thread
count). A killed worker's finished sources stay in ``parts/``; the next launch computes only the
sources without a current part, and sources added later (on any machine) append the same way.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merit_lab.config.schema import CalibrationConfig, MixtureConfig, SketchSpec
from merit_lab.envelope import load_enveloped, save_enveloped

__all__ = [
    "GradientJob",
    "agreed_info",
    "assemble_bank",
    "current_sources",
    "job_paths",
    "launch_jobs",
    "read_done",
    "run_job",
    "shard_sources",
]

log = logging.getLogger(__name__)

WORKERS_DIR = "workers"
# The bank-info fields a launcher knows before any worker has loaded θ0; the others
# (n_parameters, dtype, accumulate) are read off the loaded model by the workers.
REQUEST_FIELDS = ("model", "parameters", "sketch", "n", "max_length", "long_examples", "loss")
# <i>.job.json and <i>.done.json; files from before the envelope are read as version 1
JOB_FORMAT, JOB_VERSION = "merit-lab/gradient-job", 1
DONE_FORMAT, DONE_VERSION = "merit-lab/gradient-worker-done", 1


@dataclass(frozen=True)
class GradientJob:
    """All one worker needs, self-contained so that any machine can run it from its JSON."""

    worker: int  # index of this worker (its files: workers/<worker>.job.json, .done.json)
    model: str  # θ0: a local HF folder with safetensors (the launcher resolves hub ids)
    out_dir: str  # the bank folder: parts/ and workers/ go inside
    sources: tuple[str, ...]  # the sources this worker computes, in order
    mixture: Mapping[str, Any] = field(default_factory=lambda: {"path": "demo"})  # load_mixture
    sketch: Mapping[str, Any] = field(default_factory=lambda: SketchSpec().to_dict())
    n: int = CalibrationConfig.n
    micro_batch_size: int = CalibrationConfig.micro_batch_size
    micro_batch_tokens: int | None = CalibrationConfig.micro_batch_tokens
    gradient_checkpointing: bool = CalibrationConfig.gradient_checkpointing
    max_length: int = CalibrationConfig.max_length
    long_examples: str = MixtureConfig.long_examples
    preset: str = "all"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    device: str = "auto"
    dtype: str = "float32"
    trust_remote_code: bool = False
    tokenizer: str = ""  # a tokenizer folder of its own ("": θ0's)
    model_fingerprint: str = ""  # keys the parts: another θ0's parts are never reused
    source_keys: Mapping[str, str] = field(default_factory=dict)  # keys the parts per source
    # a LoRA bank: the warmed-up adapter folder (`merit_lab.gradients.lora_bank`)
    lora_adapter: str = ""
    folds: int = 1  # calibration.folds: each source's fold rows go into its part too
    fold_deal: str = CalibrationConfig.fold_deal  # calibration.fold_deal

    def __post_init__(self) -> None:
        for name in ("sources", "include", "exclude"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.sources:
            raise ValueError(f"gradient worker {self.worker}: no sources")

    def save(self, path: str | Path) -> Path:
        """Write the job file (its fields under the envelope's header), atomically."""
        save_enveloped(Path(path), JOB_FORMAT, JOB_VERSION, dataclasses.asdict(self))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> GradientJob:
        """Read a job file; another format, a newer version or an unknown field is refused."""
        data = load_enveloped(Path(path), JOB_FORMAT, JOB_VERSION, legacy=True)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown gradient-job fields {sorted(unknown)}")
        return cls(**data)


def job_paths(out_dir: str | Path, worker: int) -> tuple[Path, Path]:
    """(job file, done file) of ``worker`` in the bank folder ``out_dir``."""
    folder = Path(out_dir) / WORKERS_DIR
    return folder / f"{worker}.job.json", folder / f"{worker}.done.json"


def shard_sources(
    names: Sequence[str], costs: Mapping[str, float], workers: int
) -> list[list[str]]:
    """Split ``names`` into at most ``workers`` shards of near-equal cost (tokens, say).

    Longest first onto the least-loaded worker (deterministic: ties go to the lower index);
    each shard keeps the order of ``names``. Empty shards are dropped.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    heap = [(0.0, w) for w in range(workers)]
    owner: dict[str, int] = {}
    for name in sorted(names, key=lambda s: (-float(costs.get(s, 1.0)), names.index(s))):
        load, w = heapq.heappop(heap)
        owner[name] = w
        heapq.heappush(heap, (load + float(costs.get(name, 1.0)), w))
    shards = [[s for s in names if owner[s] == w] for w in range(workers)]
    return [s for s in shards if s]


def run_job(job: GradientJob | str | Path) -> dict[str, Any]:
    """Compute a worker's sources into ``parts/`` and write its ``done`` file; returns that."""
    from merit_lab.data.mixture import load_mixture
    from merit_lab.gradients.estimate import estimate_gradients
    from merit_lab.models.loading import load_model, load_tokenizer

    job = job if isinstance(job, GradientJob) else GradientJob.load(job)
    mix_args = dict(job.mixture)
    mixture = load_mixture(mix_args.pop("path"), **mix_args).select(job.sources)
    tok = load_tokenizer(job.tokenizer or job.model, trust_remote_code=job.trust_remote_code)
    model = load_model(
        job.model, device=job.device, dtype=job.dtype, trust_remote_code=job.trust_remote_code
    )
    lora = None
    if job.lora_adapter:  # the LESS way: gradients on the warmed-up adapter's A and B only
        from merit_lab.gradients.lora_bank import load_lora_model, warmup_info

        model, lora = load_lora_model(model, job.lora_adapter), warmup_info(job.lora_adapter)
    bank = estimate_gradients(
        model,
        tok,
        mixture,
        sketch=SketchSpec.from_dict(dict(job.sketch)),
        n=job.n,
        micro_batch_size=job.micro_batch_size,
        micro_batch_tokens=job.micro_batch_tokens,
        gradient_checkpointing=job.gradient_checkpointing,
        max_length=job.max_length,
        long_examples=job.long_examples,
        preset=job.preset,
        include=job.include or None,
        exclude=job.exclude or None,
        out_dir=job.out_dir,
        sources=job.sources,
        model_fingerprint=job.model_fingerprint,
        source_keys=job.source_keys,
        save_bank=False,
        lora=lora,
        folds=job.folds,
        fold_deal=job.fold_deal,
    )
    info = {k: v for k, v in bank.info.items() if k != "throughput"}
    done = {
        "worker": job.worker,
        "sources": list(job.sources),
        "info": info,
        "throughput": bank.info["throughput"],
    }
    save_enveloped(job_paths(job.out_dir, job.worker)[1], DONE_FORMAT, DONE_VERSION, done)
    return done


def read_done(path: str | Path) -> dict[str, Any]:
    """A worker's ``<i>.done.json``: its worker, sources, bank info and throughput (another
    format or a newer version is refused with `merit_lab.envelope.EnvelopeError`)."""
    return load_enveloped(Path(path), DONE_FORMAT, DONE_VERSION, legacy=True)


def current_sources(
    out_dir: str | Path,
    names: Sequence[str],
    info: Mapping[str, Any],
    source_keys: Mapping[str, str],
    folds: int = 1,
    micro_batch_size: int = CalibrationConfig.micro_batch_size,
    micro_batch_tokens: int | None = CalibrationConfig.micro_batch_tokens,
    fold_deal: str = CalibrationConfig.fold_deal,
) -> list[str]:
    """The sources of ``names`` that already have a current part for the bank ``info`` (with
    ``folds`` > 1: holding that many fold rows, dealt alike: ``fold_deal`` and, for whole
    batches, the micro-batching decide which examples each fold holds, `batching.fold_batches`)."""
    from merit_lab.gradients.bank import read_part
    from merit_lab.gradients.batching import fold_batching

    deal = fold_batching(folds, micro_batch_size, micro_batch_tokens, fold_deal)
    return [s for s in names if read_part(out_dir, s, info, source_keys, folds, deal) is not None]


def assemble_bank(
    out_dir: str | Path,
    names: Sequence[str],
    info: Mapping[str, Any],
    source_keys: Mapping[str, str],
    folds: int = 1,
    micro_batch_size: int = CalibrationConfig.micro_batch_size,
    micro_batch_tokens: int | None = CalibrationConfig.micro_batch_tokens,
    fold_deal: str = CalibrationConfig.fold_deal,
):
    """The bank of ``names`` from their parts (rows in that order; with ``folds`` > 1 their
    fold rows too, dealt alike, `current_sources`), or a ValueError naming the sources whose
    part is missing or stale."""
    import numpy as np

    from merit_lab.gradients.bank import BankParts, GradientBank, read_part
    from merit_lab.gradients.batching import fold_batching

    batching = fold_batching(folds, micro_batch_size, micro_batch_tokens, fold_deal)
    found = {s: read_part(out_dir, s, info, source_keys, folds, batching) for s in names}
    missing = [s for s, part in found.items() if part is None]
    if missing:
        raise ValueError(
            f"{out_dir}/parts: no current part for {len(missing)} source(s) {missing[:8]}; "
            "run the gradients stage again: only these are computed"
        )
    rows = np.stack([found[s][0] for s in names]).astype(np.float32, copy=False)
    stats = {s: found[s][1] for s in names}
    if folds == 1:
        return GradientBank(tuple(names), rows, dict(info), stats)
    parts = BankParts(Path(out_dir) / "parts", info["key"], source_keys)
    fold_rows = np.empty((len(names), folds, rows.shape[1]), dtype=np.float32)
    for i, s in enumerate(names):
        fold_rows[i] = parts.read_folds(s, folds, batching)[0]
    tokens = np.array([stats[s]["fold_tokens"] for s in names], dtype=np.int64)
    return GradientBank(tuple(names), rows, dict(info), stats, fold_rows, tokens)


def agreed_info(dones: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The bank info every worker reported; a ValueError when two workers disagree (another
    dtype or θ0 on another machine would give rows that cannot share a bank)."""
    keys = {d["info"]["key"] for d in dones}
    if len(keys) != 1:
        diff = sorted(
            k for k in dones[0]["info"] if len({json.dumps(d["info"].get(k)) for d in dones}) > 1
        )
        raise ValueError(f"gradient workers computed different banks (fields {diff} differ)")
    return dict(dones[0]["info"])


def launch_jobs(
    paths: Sequence[str | Path],
    *,
    mode: str = "local",
    n_procs: int | None = None,
    gpus: Sequence[int] | None = None,
    slurm: Mapping[str, Any] | None = None,
    executor_folder: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Run gradient jobs and return their ``done`` records, in the order given.

    Args:
        paths: job files (`GradientJob.save`).
        mode: "sequential" (one after the other in this process), "local" (subprocesses: one
            per GPU at a time, or ``n_procs`` CPU processes sharing the cores, default all of
            them) or "slurm" (one submitit job each, an array on SLURM): the branches' modes.
    Raises:
        RuntimeError: naming each failed worker with its log tail, after the others finished.
    """
    from merit_lab.jobs import LocalJob, module_command, run_local, run_submitit

    specs = [GradientJob.load(p) for p in paths]
    if mode == "sequential":
        return [run_job(job) for job in specs]
    names = [f"gradient worker {j.worker}" for j in specs]
    if mode == "local":
        logs = [job_paths(j.out_dir, j.worker)[0].with_name(f"{j.worker}.log") for j in specs]
        jobs = [
            LocalJob(name, module_command("merit_lab.gradients.workers", p), log)
            for name, p, log in zip(names, paths, logs, strict=True)
        ]
        import torch

        cuda = any(j.device != "cpu" for j in specs) and torch.cuda.is_available()
        if n_procs is None and gpus is None and not cuda:
            n_procs = len(jobs)  # every worker at once, the cores split between them
        run_local(jobs, n_procs=n_procs, gpus=gpus, use_gpus=cuda)
    elif mode == "slurm":
        folder = Path(executor_folder or Path(specs[0].out_dir) / WORKERS_DIR / "submitit")
        run_submitit(
            run_job,
            [str(p) for p in paths],
            names=names,
            slurm=slurm or {},
            folder=folder,
            job_name="merit-gradients",
        )
    else:
        raise ValueError(f"mode must be sequential, local or slurm, not {mode!r}")
    return [read_done(job_paths(j.out_dir, j.worker)[1]) for j in specs]


def _main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m merit_lab.gradients.workers JOB.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    done = run_job(argv[0])
    print(f"worker {done['worker']}: {len(done['sources'])} sources")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
