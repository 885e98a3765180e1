"""The analysis stages, before any training: mixture → gradients → conflict → partition.

Input: a run config. Output: ``mixture.json`` (counts, per-example tokens, a content key, the
over-long examples and any shortfall per source), ``gradients/`` (the sketched bank, one part
per source), ``conflict.json`` and ``partition.json``. Each stage keys its artifact by the
content of its inputs, so a new or edited source redoes exactly what depends on it (only that
source's gradient).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shlex
import sys
from pathlib import Path

from tqdm.auto import tqdm

from merit_lab.analysis.conflict import ConflictSpace, compute_conflict_space
from merit_lab.config.schema import RunConfig, config_hash
from merit_lab.data.checks import mixture_overlaps, read_hash_list
from merit_lab.data.formatting import count_overflow, tokenize_example
from merit_lab.data.mixture import (
    SPLITS,
    MixtureError,
    Source,
    small_source_message,
    source_shortfall,
)
from merit_lab.envelope import EnvelopeError
from merit_lab.gradients.bank import FOLDS_FILE, GradientBank, request_info
from merit_lab.gradients.estimate import estimate_gradients
from merit_lab.gradients.lora_bank import WARMUP_DIR, load_lora_model, warm_up_for_run, warmup_info
from merit_lab.gradients.workers import (
    WORKERS_DIR,
    GradientJob,
    agreed_info,
    assemble_bank,
    current_sources,
    job_paths,
    launch_jobs,
    shard_sources,
)
from merit_lab.io import atomic_write_bytes, atomic_write_json, read_json
from merit_lab.models.checkpoints import fingerprint_checkpoint
from merit_lab.models.loading import (
    load_model,
    load_tokenizer,
    model_source,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from merit_lab.partition.methods import ROW_METHODS, make_partition
from merit_lab.partition.plan import Partition
from merit_lab.partition.session import EditSession
from merit_lab.pipeline.folds import save_fold_stability
from merit_lab.pipeline.layers import (
    bank_calibration,
    conflict_key,
    conflict_rows,
    layer_collector,
    layers_current,
    partition_view,
    save_layers,
)
from merit_lab.pipeline.rundir import (
    SIZE_UNIT,
    RunDir,
    load_run_mixture,
    mixture_args,
    source_counts,
    writes_run,
)

__all__ = [
    "load_edit_session",
    "make_partition",
    "model_fingerprint",
    "save_convergence",
    "stage_conflict",
    "stage_gradients",
    "stage_mixture",
    "stage_partition",
]

log = logging.getLogger(__name__)


def model_fingerprint(model: str) -> str:
    """`fingerprint_checkpoint` of a local folder (the value branches record as their base), else
    the hub id as given."""
    return fingerprint_checkpoint(model) if any(Path(model).glob("*.safetensors")) else model


def _content_key(source: Source) -> str:
    """A hash of a source's examples, split by split: an edited example changes it."""
    blob = json.dumps([source.split(sp) for sp in SPLITS], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_small_sources(cfg: RunConfig, counts: dict[str, dict[str, int]]) -> dict[str, dict]:
    """Sources short of examples (name → counts and shortfall); raises under ``refuse``."""
    short = {}
    for name, c in counts.items():
        lacks = source_shortfall(c, cfg.calibration.n)
        if lacks:
            short[name] = {**c, "shortfall": lacks}
    if short and cfg.mixture.small_sources == "refuse":
        raise MixtureError(small_source_message(short))
    if short:
        log.warning("mixture.small_sources: warn; going on with %s", small_source_message(short))
    return short


def stage_mixture(cfg: RunConfig, run: RunDir) -> bool:
    mixture = load_run_mixture(cfg)
    content = {s.name: _content_key(s) for s in mixture}
    calibration = bank_calibration(cfg.calibration)  # the key as before the layer fields
    key = config_hash(cfg.mixture, cfg.seed, calibration, cfg.model, cfg.train.max_length, content)
    key = config_hash(key, SIZE_UNIT)  # runs counted in another unit re-count (and re-split)
    if run.is_current("mixture", key):
        log.info("mixture: up to date")
        return False
    # a source too small for the run is refused before any tokenisation work
    _check_small_sources(
        cfg, {s.name: {f"n_{sp}": len(s.split(sp)) for sp in SPLITS} for s in mixture}
    )
    tok = load_tokenizer(resolve_model_path(cfg.model), trust_remote_code=cfg.trust_remote_code)
    policy = cfg.mixture.long_examples
    # each split at the length its consumer tokenises it at (train: the branches; eval: the
    # evaluation; calibration: the gradient stage)
    lengths = {"train": cfg.train.max_length, "calibration": cfg.calibration.max_length}
    lengths["eval"] = cfg.train.max_length
    sources = []
    for s in tqdm(mixture, desc="tokenising sources", unit="source"):
        toks = {
            sp: [tokenize_example(tok, ex, lengths[sp], policy) for ex in s.split(sp)]
            for sp in SPLITS
        }
        # under `skip` an over-long example leaves its split before anything is counted
        kept = {
            sp: [
                (ex, t)
                for ex, t in zip(s.split(sp), toks[sp], strict=True)
                if t.overflow != "skipped"
            ]
            for sp in SPLITS
        }
        train = [t for _, t in kept["train"]]
        sources.append(
            {
                "name": s.name,
                **{f"n_{sp}": len(kept[sp]) for sp in SPLITS},
                # counted at the length branches train at: these counts are the merge weights' N_k
                "train_tokens": sum(t.n_tokens for t in train),
                "train_response_tokens": sum(t.n_response_tokens for t in train),
                "calibration_ids": [ex["id"] for ex, _ in kept["calibration"][: cfg.calibration.n]],
                "metadata": dict(s.metadata),
                "origin": s.origin,
                "content_key": content[s.name],
                # what a down-weighted subset of this source trains (curation.subset_counts),
                # in all tokens and in the size unit (response tokens)
                "train_example_tokens": [t.n_tokens for t in train],
                "train_example_response_tokens": [t.n_response_tokens for t in train],
                # per split: how many were over max_length, and what the policy did to them
                "long_examples": {sp: count_overflow(toks[sp]) for sp in SPLITS},
                "shortfall": "",
            }
        )
    # `skip` may have left a source short: checked again on what it kept
    short = _check_small_sources(
        cfg, {e["name"]: {f"n_{sp}": e[f"n_{sp}"] for sp in SPLITS} for e in sources}
    )
    for entry in sources:
        entry["shortfall"] = short.get(entry["name"], {}).get("shortfall", "")
    hashes = cfg.mixture.overlap_hashes
    overlaps = mixture_overlaps(mixture.sources, read_hash_list(hashes) if hashes else None)
    atomic_write_json(
        run.mixture,
        {
            "key": key,
            "origin": mixture.origin,
            "seed": mixture.seed,
            "info": dict(mixture.info),
            "policies": {
                "long_examples": policy,
                "small_sources": cfg.mixture.small_sources,
                "max_length": lengths,
            },
            "sources": sources,
            "overlaps": overlaps,  # duplicates across sources, eval in train, listed examples
        },
    )
    return True


def stage_gradients(cfg: RunConfig, run: RunDir) -> bool:
    content = {s["name"]: s.get("content_key", "") for s in run.read_mixture()["sources"]}
    names = list(content)
    model_path = resolve_model_path(cfg.model)
    fingerprint = model_fingerprint(model_path)
    key = config_hash(
        cfg.mixture,
        cfg.seed,
        bank_calibration(dataclasses.replace(cfg.calibration, workers=1)),  # no row changes
        cfg.sketch,
        cfg.parameters,
        cfg.dtype,
        content,
        fingerprint,
        *_lora_bank_settings(cfg),  # nothing unless calibration.lora_warmup_steps
        *_fold_settings(cfg.calibration),  # nothing unless calibration.folds > 1
    )
    # a bank without its fold rows (deleted, or cut off by a kill under an earlier write order
    # that put them after bank.json) is redone from its parts: fold_stability.json needs them
    folds_kept = cfg.calibration.folds == 1 or (run.gradients / FOLDS_FILE).is_file()
    if (
        run.is_current("gradients", key)
        and folds_kept
        and layers_current(cfg, run, content, fingerprint)
    ):
        log.info("gradients: up to date")
        return False
    if cfg.calibration.workers > 1:
        bank = _sharded_bank(cfg, run, names, content, model_path, fingerprint)
    else:
        bank = _one_process_bank(cfg, run, names, content, model_path, fingerprint)
    info = {**bank.info, "stage_key": key, "model_source": model_source(cfg.model)}
    dataclasses.replace(bank, info=info).save(run.gradients)  # with its fold rows
    save_layers(cfg, run, bank, content, fingerprint)  # calibration.layer_groups (layers.py)
    return True


def _fold_settings(cal) -> list:
    """What the fold rows depend on beyond the rows': the folds, and how they are dealt when
    not by example (empty with folds off, so a run's stage key stays as it was)."""
    if cal.folds == 1:
        return []
    deal = {} if cal.fold_deal == "examples" else {"fold_deal": cal.fold_deal}
    return [{"folds": cal.folds} | deal]


def _lora_bank_settings(cfg: RunConfig) -> list:
    """What a LoRA bank's rows depend on beyond a full bank's: the warm-up's LoRA and training
    settings (empty for a full-parameter bank, so its stage key is as before)."""
    t = cfg.train
    if not cfg.calibration.lora_warmup_steps:
        return []
    return [
        t.lora_r,
        t.lora_alpha,
        t.lora_dropout,
        t.lora_target_modules,
        t.lora_rslora,
        t.lr,
        t.batch_size,
        t.seed,
        t.max_length,
    ]


def _lora_warmup(
    cfg: RunConfig, run: RunDir, mixture, content: dict, model_path: str, fingerprint: str
):
    """(adapter folder, bank info of it) of a LoRA bank (warmed up once, then reused), or
    (None, None) for a full-parameter bank."""
    folder = warm_up_for_run(
        cfg, mixture, run.gradients / WARMUP_DIR, model_path, fingerprint, content
    )
    return (folder, warmup_info(folder)) if folder is not None else (None, None)


def _bank_settings(cfg: RunConfig) -> dict:
    """`estimate_gradients` / `GradientJob` keyword arguments from the run's config."""
    cal, par = cfg.calibration, cfg.parameters
    return dict(
        n=cal.n,
        micro_batch_size=cal.micro_batch_size,
        micro_batch_tokens=cal.micro_batch_tokens,
        gradient_checkpointing=cal.gradient_checkpointing,
        max_length=cal.max_length,
        long_examples=cfg.mixture.long_examples,
        preset=par.preset,
        folds=cal.folds,
        fold_deal=cal.fold_deal,
    )


def _one_process_bank(
    cfg: RunConfig, run: RunDir, names: list[str], content: dict, model_path: str, fingerprint: str
) -> GradientBank:
    mixture = load_run_mixture(cfg)
    tok = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    model = load_model(
        model_path, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code
    )
    adapter, lora = _lora_warmup(cfg, run, mixture, content, model_path, fingerprint)
    if adapter is not None:  # the LESS way: the rows are gradients of the adapter's A and B
        model = load_lora_model(model, adapter)
    return estimate_gradients(
        model,
        tok,
        mixture,
        sketch=cfg.sketch,
        include=cfg.parameters.include,
        exclude=cfg.parameters.exclude,
        out_dir=run.gradients,
        sources=names,
        model_fingerprint=fingerprint,
        source_keys=content,  # parts: reused for the same examples
        save_bank=False,  # stage_gradients saves it once, with its stage key
        on_gradient=layer_collector(cfg, run, model, content, fingerprint),  # same backward
        lora=lora,
        **_bank_settings(cfg),
    )


def _sharded_bank(
    cfg: RunConfig, run: RunDir, names: list[str], content: dict, model_path: str, fingerprint: str
) -> GradientBank:
    """The bank from ``calibration.workers`` workers launched like the branches (train.launcher;
    "sequential" runs them as local processes). Sources with a current part are not redone:
    a killed worker's finished sources, or the sources of an earlier, smaller mixture."""
    adapter, lora = None, None
    if cfg.calibration.lora_warmup_steps:  # warmed up once here, shared by every worker
        adapter, lora = _lora_warmup(
            cfg, run, load_run_mixture(cfg), content, model_path, fingerprint
        )
    request = request_info(
        sketch=cfg.sketch,
        include=cfg.parameters.include,
        exclude=cfg.parameters.exclude,
        model_fingerprint=fingerprint,
        lora=lora,
        **_bank_settings(cfg),
    )
    # the dtype too, as a worker here would resolve it: parts of another dtype are not reused
    dtype = resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    request["dtype"] = str(dtype).removeprefix("torch.")
    info = _earlier_info(run.gradients, request)
    cal = cfg.calibration
    fold_kw = dict(  # which fold rows a part must hold
        folds=cal.folds,
        micro_batch_size=cal.micro_batch_size,
        micro_batch_tokens=cal.micro_batch_tokens,
        fold_deal=cal.fold_deal,
    )
    done = current_sources(run.gradients, names, info, content, **fold_kw) if info else []
    todo = [s for s in names if s not in done]
    throughput: dict = {"tokens": 0, "seconds": 0.0, "sources": 0, "workers": {}}
    if todo:
        info, throughput = _launch_workers(
            cfg, run, todo, content, model_path, fingerprint, info, adapter
        )
    bank = assemble_bank(run.gradients, names, info, content, **fold_kw)
    log.info(
        "gradients: %d sources by %d workers, %d reused",
        len(todo),
        len(throughput["workers"]),
        len(done),
    )
    return dataclasses.replace(bank, info={**info, "throughput": throughput})


def _earlier_info(folder: Path, request: dict) -> dict | None:
    """The bank info an earlier worker reported for the same request (its parts are reusable)."""
    for path in sorted(
        (folder / WORKERS_DIR).glob("*.done.json"), key=lambda p: -p.stat().st_mtime
    ):
        info = read_json(path)["info"]
        if all(info.get(k) == v for k, v in request.items()):
            return info
    return None


def _launch_workers(
    cfg: RunConfig,
    run: RunDir,
    todo: list[str],
    content: dict,
    model_path: str,
    fingerprint: str,
    earlier: dict | None,
    adapter: Path | None = None,
) -> tuple[dict, dict]:
    counts = {s["name"]: s for s in run.read_mixture()["sources"]}
    cost = {  # calibration tokens, estimated from the source's mean train example
        s: min(cfg.calibration.n, counts[s]["n_calibration"] or cfg.calibration.n)
        * counts[s]["train_tokens"]
        / max(1, counts[s]["n_train"])
        for s in todo
    }
    mixture = mixture_args(cfg)
    if Path(mixture["path"]).exists():  # absolute: a worker may start in another directory
        mixture["path"] = str(Path(mixture["path"]).resolve())
    for old in (run.gradients / WORKERS_DIR).glob("*.json"):  # an earlier launch's jobs
        old.unlink()
    paths = []
    for i, shard in enumerate(shard_sources(todo, cost, cfg.calibration.workers)):
        job_file = job_paths(run.gradients, i)[0]
        job = GradientJob(
            worker=i,
            model=str(Path(model_path).resolve()),
            out_dir=str(run.gradients.resolve()),
            sources=tuple(shard),
            mixture=mixture,
            sketch=cfg.sketch.to_dict(),
            include=cfg.parameters.include,
            exclude=cfg.parameters.exclude,
            device=cfg.device,
            dtype=cfg.dtype,
            trust_remote_code=cfg.trust_remote_code,
            model_fingerprint=fingerprint,
            source_keys={s: content[s] for s in shard},
            lora_adapter=str(adapter.resolve()) if adapter is not None else "",
            **_bank_settings(cfg),
        )
        paths.append(job.save(job_file))
    t = cfg.train
    mode = "local" if t.launcher == "sequential" else t.launcher
    # every worker at once (on train.gpus, else every visible GPU, else the CPU cores)
    dones = launch_jobs(paths, mode=mode, gpus=list(t.gpus) or None, slurm=t.slurm)
    info = agreed_info(dones if earlier is None else [*dones, {"info": earlier}])
    workers = {str(d["worker"]): d["throughput"] for d in dones}
    throughput = {
        "tokens": sum(w["tokens"] for w in workers.values()),
        "seconds": max(w["seconds"] for w in workers.values()),
        "sources": sum(w["sources"] for w in workers.values()),
        "workers": workers,
    }
    return info, throughput


def stage_conflict(cfg: RunConfig, run: RunDir) -> bool:
    bank_key = conflict_key(cfg, run)  # the bank's (and partition.layer_group's: layers.py)
    folds_redone = save_fold_stability(cfg, run)  # fold_stability.json, its own key (folds.py)
    if run.is_current("conflict", bank_key) and _space_readable(run):
        log.info("conflict: up to date")
        return folds_redone
    names, rows = conflict_rows(cfg, run)
    extra = {"bank_key": bank_key}
    if cfg.partition.layer_group:
        extra["layer_group"] = cfg.partition.layer_group
    # conflict.safetensors (the arrays) first, conflict.json (its key marks the stage) last
    compute_conflict_space(rows, names).save(run.conflict, extra)
    return True


def _space_readable(run: RunDir) -> bool:
    """Whether conflict.json's arrays file is there whole (its header and size: nothing else is
    read), so a deleted or cut conflict.safetensors redoes the stage instead of failing later."""
    try:
        run.load_space()
    except EnvelopeError:
        raise  # a newer merit-lab's space is not overwritten by this one
    except ValueError as e:
        log.warning("conflict: %s", e)
        return False
    return True


def stage_partition(cfg: RunConfig, run: RunDir) -> bool:
    # conflict.json carries the sha256 of its arrays (a version-1 one holds them): its hash
    # keys the space without reading conflict.safetensors
    conflict = config_hash(read_json(run.conflict))
    key = config_hash(partition_view(cfg.partition), conflict, run.stored_key("mixture"))
    # Hand edits are never overwritten by a re-run; delete partition.json to redo it.
    if run.is_current("partition", key) or (
        run.partition.exists() and read_json(run.partition).get("edit_log")
    ):
        log.info("partition: up to date (or hand-edited)")
        return False
    space = ConflictSpace.load(run.conflict)
    examples, tokens = source_counts(run)
    p = cfg.partition
    bank = run.load_bank() if p.method in ROW_METHODS else None  # `gain` scores on the bank
    rows = {} if bank is None else {"rows": bank.rows, "row_names": bank.names}
    part = make_partition(
        space, examples, tokens, method=p.method, r=p.r, k=p.k, seed=p.seed, **rows
    )
    data = part.to_dict()
    data["params"] = {**data.get("params", {}), "stage_key": key}
    atomic_write_json(run.partition, data)
    return True


class _RunEditSession(EditSession):
    """An `EditSession` on a run: `save` writes as the run's one writer (`RunDir.writer_lock`),
    so a save while `merit-lab run` writes the run is refused, naming that process."""

    def __init__(self, run: RunDir, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run = run

    def save(self, path: str | Path | None = None) -> Path:
        with self.run.writer_lock(command=f"EditSession.save() in {shlex.join(sys.argv)}"):
            return super().save(path)


@writes_run
def save_convergence(run_dir: str | Path, table) -> Path:
    """Write a `merit_lab.analysis.convergence.gradient_convergence` table to the run's
    ``convergence.parquet`` (atomically, as the run's one writer), where the figures find it."""
    import io

    run = RunDir(Path(run_dir))
    buf = io.BytesIO()
    table.to_parquet(buf)
    return atomic_write_bytes(run.convergence, buf.getvalue())


def load_edit_session(run_dir: str | Path, partition: Partition | None = None) -> EditSession:
    """An `EditSession` on a run's ``partition.json`` (or ``partition``), saving back to it.

    The session knows every source of ``mixture.json`` with a gradient (so it can place one that
    was added after the split), each source's per-example train tokens (so a down-weight counts
    exactly what the rows will train), the run's seed (which examples a fraction keeps) and the
    gradient rows (the predicted gain of each edit).
    """
    run = RunDir(Path(run_dir))
    cfg = run.load_config()
    space = run.load_space()
    return _RunEditSession(
        run,
        partition if partition is not None else run.load_partition(),
        space,
        example_tokens=run.example_tokens(),
        seed=cfg.seed,
        rows=run.load_bank().select(space.names).rows,  # the predicted gain of each edit
        path=run.partition,
    )
