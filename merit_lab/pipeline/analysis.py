"""The analysis stages, before any training: mixture → gradients → conflict → partition.

Input: a run config. Output: ``mixture.json`` (counts, per-example tokens, a content key, the
over-long examples and any shortfall per source), ``gradients/`` (the sketched bank, one part
per source), ``conflict.json`` and ``partition.json``. Each stage keys its artifact by the
content of its inputs, so a new or edited source redoes exactly what depends on it (only that
source's gradient).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

from merit_lab.checkpoints import fingerprint_checkpoint
from merit_lab.config import RunConfig, config_hash
from merit_lab.conflict import ConflictSpace, compute_conflict_space
from merit_lab.curation import EditSession
from merit_lab.formatting import count_overflow, tokenize_example
from merit_lab.gradients import GradientBank, estimate_gradients
from merit_lab.io import atomic_write_json, read_json
from merit_lab.mixture import (
    SPLITS,
    MixtureError,
    Source,
    small_source_message,
    source_shortfall,
)
from merit_lab.models import load_model, load_tokenizer, model_source, resolve_model_path
from merit_lab.partition import Partition, make_partition
from merit_lab.pipeline.rundir import RunDir, load_run_mixture, source_counts

__all__ = [
    "load_edit_session",
    "make_partition",
    "model_fingerprint",
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
    key = config_hash(
        cfg.mixture, cfg.seed, cfg.calibration, cfg.model, cfg.train.max_length, content
    )
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
                # what a down-weighted subset of this source trains (curation.subset_counts)
                "train_example_tokens": [t.n_tokens for t in train],
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
        cfg.calibration,
        cfg.sketch,
        cfg.parameters,
        cfg.dtype,
        content,
        fingerprint,
    )
    if run.is_current("gradients", key):
        log.info("gradients: up to date")
        return False
    mixture = load_run_mixture(cfg)
    tok = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    model = load_model(
        model_path, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code
    )
    bank = estimate_gradients(
        model,
        tok,
        mixture,
        sketch=cfg.sketch,
        n=cfg.calibration.n,
        micro_batch_size=cfg.calibration.micro_batch_size,
        max_length=cfg.calibration.max_length,
        include=cfg.parameters.include,
        exclude=cfg.parameters.exclude,
        long_examples=cfg.mixture.long_examples,
        out_dir=run.gradients,
        sources=names,
        model_fingerprint=fingerprint,
        source_keys=content,  # a part is reused only for the same examples
    )
    info = {**bank.info, "stage_key": key, "model_source": model_source(cfg.model)}
    GradientBank(bank.names, bank.rows, info, bank.stats).save(run.gradients)
    return True


def stage_conflict(cfg: RunConfig, run: RunDir) -> bool:
    bank_key = run.stored_key("gradients")
    if run.is_current("conflict", bank_key):
        log.info("conflict: up to date")
        return False
    bank = run.load_bank()
    data = compute_conflict_space(bank.rows, bank.names).to_dict()
    data["bank_key"] = bank_key
    atomic_write_json(run.conflict, data)
    return True


def stage_partition(cfg: RunConfig, run: RunDir) -> bool:
    key = config_hash(
        cfg.partition, config_hash(read_json(run.conflict)), run.stored_key("mixture")
    )
    # Hand edits are never overwritten by a re-run; delete partition.json to redo it.
    if run.is_current("partition", key) or (
        run.partition.exists() and read_json(run.partition).get("edit_log")
    ):
        log.info("partition: up to date (or hand-edited)")
        return False
    space = ConflictSpace.load(run.conflict)
    examples, tokens = source_counts(run)
    p = cfg.partition
    part = make_partition(space, examples, tokens, method=p.method, r=p.r, k=p.k, seed=p.seed)
    data = part.to_dict()
    data["params"] = {**data.get("params", {}), "stage_key": key}
    atomic_write_json(run.partition, data)
    return True


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
    return EditSession(
        partition if partition is not None else run.load_partition(),
        space,
        example_tokens=run.example_tokens(),
        seed=cfg.seed,
        rows=run.load_bank().select(space.names).rows,  # the predicted gain of each edit
        path=run.partition,
    )
