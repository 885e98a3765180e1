"""Running the comparison's rows: train every branch, merge each split once, evaluate every row.

Input: a run directory whose partition stage is done, and the config's ``experiments`` (planned
into rows and branch specs by `merit_lab.pipeline.rows`). Output, under ``runs/<name>/``::

    branches/<experiment>/partition.json   the grouping that experiment trains
    branches/<experiment>/<k>/             one branch: spec.json, checkpoints/, final/, log.jsonl
    joint/ep<epochs>-s<seed>/              a joint run (shared by joint rows and soups)
    merged/<row>/                          HF folder + merge_manifest.json + mergekit.yaml
    controls/<row>_<control>/              the controls of a merged row (`pipeline.controls`)
    eval/<row>.parquet, eval.parquet       one row per (model, source, split, metric)

With ``eval.heldout`` every row is also scored on the evaluation-only sources of that folder
(split ``heldout`` in the table): abilities no row trains, to see what fine-tuning costs.

Every branch starts from θ0 and shares the training hyperparameters; a source contributes the
same tokens whichever branch it lands in, and a joint run on every source for the same epochs
trains on the same token budget as all branches of a split together.
"""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from merit_lab.config.schema import RunConfig, config_hash
from merit_lab.data.mixture import Mixture
from merit_lab.evaluation.evaluate import EVAL_METRICS, evaluate_model
from merit_lab.evaluation.heldout import HELDOUT_SPLIT, load_heldout
from merit_lab.evaluation.lm_eval import run_lm_eval
from merit_lab.evaluation.lmms_eval import run_lmms_eval
from merit_lab.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    sha256_file,
)
from merit_lab.merging.lora import merge_lora
from merit_lab.merging.stream import merge_checkpoints, record_path
from merit_lab.models.checkpoints import fingerprint_checkpoint
from merit_lab.models.loading import load_model, load_tokenizer, resolve_model_path
from merit_lab.models.lora import ADAPTER_CONFIG, ADAPTER_DIR
from merit_lab.pipeline.controls import DONE, load_controls
from merit_lab.pipeline.curation import mixture_names
from merit_lab.pipeline.rows import CONTROL_KINDS, SNAPSHOT, ModelRow, model_rows, plan_specs
from merit_lab.pipeline.rundir import (
    SIZE_UNIT,
    RunDir,
    load_run_mixture,
    run_config,
    writes_run,
)
from merit_lab.training.branch_log import MANIFEST
from merit_lab.training.launch import launch_branches
from merit_lab.training.snapshots import SNAPSHOT_INFO

__all__ = [
    "evaluate_rows",
    "heldout_fingerprint",
    "load_heldout_sources",
    "merge_rows",
    "model_rows",
    "train_experiments",
]

log = logging.getLogger(__name__)

_UNSET_OK = ("lm_eval", "heldout", "lmms_eval")  # eval fields left out of the cache key while unset


def _run(cfg: RunConfig) -> RunDir:
    """The run of ``cfg``: ``<output_dir>/<name>`` for a config being run, the folder itself for
    one read from a run folder (`RunDir.load_config` locates it there)."""
    return RunDir(Path(cfg.run_dir))


@writes_run
def train_experiments(
    cfg: RunConfig | RunDir | str | Path, experiments: Sequence[str] | None = None
) -> list[Path]:
    """Train every branch and joint run not yet done, with the configured launcher (``cfg``: a
    config, or a run folder: `run_config`).

    Returns:
        The ``final/`` folders, each once.
    """

    cfg = run_config(cfg)
    unique: dict[str, object] = {}
    for specs in plan_specs(cfg, experiments).values():
        for s in specs:
            unique.setdefault(s.output_dir, s)
    t = cfg.train
    return launch_branches(
        list(unique.values()),
        mode=t.launcher,
        n_procs=t.n_procs,
        gpus=list(t.gpus) or None,
        slurm=t.slurm,
    )


def _merge_key(row: ModelRow, weights: Sequence[float], params: dict) -> str:

    return config_hash(
        row.merge_method, list(weights), params, [fingerprint_checkpoint(p) for p in row.inputs]
    )


@writes_run
def merge_rows(cfg: RunConfig | RunDir | str | Path) -> list[dict]:
    """Merge every split and soup row once; skip merges whose inputs and settings are unchanged
    (``cfg``: a config, or a run folder: `run_config`).

    Linear weights are each branch's trained response tokens (the run's `SIZE_UNIT`) over the
    total, w_k = N_k / Σ_j N_j, read from the branches' ``merit_branch.json``; they equal the
    partition's weights (the same unit, which the split balanced) when the branches trained one
    epoch.

    Returns:
        Per merged row: label, method, weights, seconds (0 when skipped), output folder.
    """

    cfg = run_config(cfg)
    run, base = _run(cfg), Path(resolve_model_path(cfg.model))
    done = []
    for row in model_rows(cfg):
        if not row.inputs:
            continue
        missing = [str(p) for p in row.inputs if not (p / MANIFEST).is_file()]
        if missing:
            raise FileNotFoundError(f"{row.label}: untrained branches {missing}; run stage train")
        # each branch's trained size in the run's unit (SIZE_UNIT: response tokens)
        tokens = [read_json(p / MANIFEST)[SIZE_UNIT] for p in row.inputs]
        weights = [n / sum(tokens) for n in tokens] if row.merge_method == "linear" else None
        params = dict(cfg.merge.params.get(row.merge_method, {}))
        key = _merge_key(row, weights or [], params)
        manifest = row.model_dir / "merge_manifest.json"
        if run.is_current("merged", key, row.label):
            _repoint_merge_records(row, base if base.is_dir() else None, run.root)
            weights = read_json(manifest)["weights"]  # as the merge that made it recorded them
            done.append(
                {"label": row.label, "method": row.merge_method, "weights": weights, "seconds": 0.0}
            )
            continue
        if cfg.train.lora_r and row.merge_method in ("linear", "uniform"):
            # exact: θ0 + Σ w_k s_k B_k A_k from the adapters, plus the stacked adapter; ties and
            # task arithmetic take the branches' dense ΔW_k = θ_k − θ0 below, tensor by tensor
            report = merge_lora(
                row.inputs,
                row.model_dir,
                base=base,
                weights=weights,
                method=row.merge_method,
                shard_size=cfg.merge.shard_size,
                overwrite=True,
                relative_root=run.root,
            )
        else:
            report = merge_checkpoints(
                row.inputs,
                row.model_dir,
                method=row.merge_method,
                weights=weights,
                base=base if base.is_dir() else None,
                params=params,
                shard_size=cfg.merge.shard_size,
                overwrite=True,
                relative_root=run.root,  # the branches: relative, so the records move with it
            )
        _stamp_manifest(manifest, key, tokens)
        done.append(
            {
                "label": row.label,
                "method": row.merge_method,
                "weights": list(report.weights),
                "seconds": report.seconds,
            }
        )
    return done


def _stamp_manifest(path: Path, key: str, tokens: Sequence[int]) -> None:
    """Record the stage key and the branch token counts N_k beside the merge's own facts."""
    data = read_json(path)
    data.update(merit_key=key, branch_tokens=list(tokens))
    atomic_write_json(path, data)


def _repoint_merge_records(row: ModelRow, base: Path | None, root: Path) -> None:
    """Write a current merge's records as a merge made now would (`record_path`): the inputs
    inside the run relative to the merged folder, θ0 where it is now. A run that moved, θ0 that
    moved, or a run from before relative records (absolute paths to where it was) is put right
    without re-merging: the weights are the same files, so their hashes stay true; the
    rewritten records' hashes are updated in ``merge_manifest.json``."""
    import yaml

    folder = row.model_dir
    data = read_json(folder / "merge_manifest.json")
    files = data["output"]["files"]
    inputs = [record_path(p, folder, root) for p in row.inputs]
    changed = [i["path"] for i in data["inputs"]] != inputs
    for entry, p in zip(data["inputs"], inputs, strict=True):
        entry["path"] = p
    base_path = record_path(base, folder, root) if base is not None else None
    if data.get("base") and base_path is not None and data["base"]["path"] != base_path:
        data["base"]["path"], changed = base_path, True
    mk_path = folder / "mergekit.yaml"
    if mk_path.is_file():
        mk = yaml.safe_load(mk_path.read_text(encoding="utf-8"))
        was = copy.deepcopy(mk)
        for model, p in zip(mk["models"], inputs, strict=True):
            model["model"] = p
        if "base_model" in mk and base_path is not None:
            mk["base_model"] = base_path
        if mk != was:
            atomic_write_text(mk_path, yaml.safe_dump(mk, sort_keys=False))
            files["mergekit.yaml"], changed = sha256_file(mk_path), True
    adapter = folder / ADAPTER_DIR / ADAPTER_CONFIG  # a LoRA merge's stacked adapter: θ0
    if adapter.is_file() and base is not None:
        ad = read_json(adapter)
        name = record_path(base, adapter.parent, root)
        if ad.get("base_model_name_or_path") != name:
            atomic_write_json(adapter, {**ad, "base_model_name_or_path": name})
            files[f"{ADAPTER_DIR}/{ADAPTER_CONFIG}"], changed = sha256_file(adapter), True
    if changed:
        atomic_write_json(folder / "merge_manifest.json", data)
        log.info("%s: merge records re-pointed at the inputs' new location", row.label)


@writes_run
def evaluate_rows(cfg: RunConfig | RunDir | str | Path, *, progress: bool = True) -> pd.DataFrame:
    """Evaluate every row on the same held-out examples; cache one parquet per row (``cfg``: a
    config, or a run folder: `run_config`).

    A row is re-evaluated only when its weights or the evaluation settings changed (the cache
    key is the model folder's weight fingerprint and the eval config).

    Returns:
        The long table (written to ``eval.parquet``): model, kind, source, family, split,
        metric, value, n; ``.attrs["evaluated"]`` lists the rows scored in this call.
    """

    cfg = run_config(cfg)
    run = _run(cfg)
    mixture = load_run_mixture(cfg)
    names = mixture_names(cfg)
    tables, evaluated = [], []
    tokenizer = None
    e = cfg.eval
    heldout = load_heldout_sources(cfg, names)
    built = load_controls(run.root)["controls"]
    rows = [r for r in model_rows(cfg, controls=True) if _exists(r, built)]
    for row in rows:
        if not any(row.model_dir.glob("*.safetensors")):
            raise FileNotFoundError(f"{row.label}: no model at {row.model_dir}; run train/merge")
        key = config_hash(
            # without lm_eval and heldout when unset: the keys of runs from before them hold
            {k: v for k, v in asdict(e).items() if k not in _UNSET_OK or v is not None},
            fingerprint_checkpoint(row.model_dir),
            names,
            cfg.train.max_length,
            cfg.mixture.long_examples,
            EVAL_METRICS,
            *([heldout_fingerprint(e.heldout)] if heldout is not None else []),
        )
        cache = run.eval_cache(row.label)
        if run.is_current("eval", key, row.label):
            tables.append(pd.read_parquet(cache))
            continue
        remote = cfg.trust_remote_code
        tokenizer = tokenizer or load_tokenizer(row.model_dir, trust_remote_code=remote)
        model = load_model(
            row.model_dir, device=cfg.device, dtype=cfg.dtype, trust_remote_code=remote
        )
        parts = []
        for split in e.splits:
            parts.append(
                evaluate_model(
                    model,
                    tokenizer,
                    mixture,
                    label=row.label,
                    split=split,
                    sources=names,
                    max_examples=e.max_examples,
                    max_length=cfg.train.max_length,
                    long_examples=cfg.mixture.long_examples,
                    exact_match=e.exact_match and split == "eval",
                    max_new_tokens=e.max_new_tokens,
                    batch_size=e.batch_size,
                    progress=progress,
                )
            )
        if heldout is not None:  # the evaluation-only sources: split "heldout" rows
            scored = evaluate_model(
                model,
                tokenizer,
                heldout,
                label=row.label,
                split="eval",
                max_examples=e.max_examples,
                max_length=cfg.train.max_length,
                long_examples=cfg.mixture.long_examples,
                exact_match=e.exact_match,
                max_new_tokens=e.max_new_tokens,
                batch_size=e.batch_size,
                progress=progress,
            )
            parts.append(scored.assign(split=HELDOUT_SPLIT))
        if e.lm_eval:  # lm-evaluation-harness tasks on the loaded model: split "lm-eval" rows
            opts = {k: v for k, v in e.lm_eval.items() if k != "tasks"}
            parts.append(
                run_lm_eval(
                    row.model_dir,
                    e.lm_eval["tasks"],
                    label=row.label,
                    model=model,
                    tokenizer=tokenizer,
                    **opts,
                )
            )
        if e.lmms_eval:  # lmms-eval image-text benchmarks on the loaded model: "lmms-eval" rows
            opts = {k: v for k, v in e.lmms_eval.items() if k != "tasks"}
            parts.append(
                run_lmms_eval(
                    row.model_dir,
                    e.lmms_eval["tasks"],
                    label=row.label,
                    output_dir=run.eval_dir / "lmms-eval" / row.label.replace("/", "_"),
                    model=model,
                    tokenizer=tokenizer,
                    **opts,
                )
            )
        table = pd.concat(parts, ignore_index=True)
        table.insert(1, "kind", row.kind)
        table["key"] = key
        _write_parquet(cache, table)
        tables.append(table)
        evaluated.append(row.label)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    full = pd.concat(tables, ignore_index=True).drop(columns="key")
    if evaluated or not run.eval.is_file():
        _write_parquet(run.eval, full)
    full.attrs["evaluated"] = evaluated  # the rows scored now (the others came from the cache)
    stale = {p.name for p in run.eval_dir.glob("*.parquet")} - {
        run.eval_cache(r.label).name for r in rows
    }
    for name in stale:  # rows no longer in the config
        (run.eval_dir / name).unlink()
    return full


def _exists(row: ModelRow, controls: dict) -> bool:
    """Whether a row has a model to evaluate: every trained or merged row does (a missing one is
    an error); a control only when it is reachable (``controls``: ``controls.json``'s), a
    snapshot only when the run reached its step."""
    if row.kind in CONTROL_KINDS:
        if row.label not in controls:
            raise FileNotFoundError(f"{row.label}: no control recorded yet; run stage merge")
        return controls[row.label]["status"] == DONE
    if row.kind == SNAPSHOT:
        return (row.model_dir / SNAPSHOT_INFO).is_file()
    return True


def load_heldout_sources(cfg: RunConfig, trained: Sequence[str]) -> Mixture | None:
    """``eval.heldout``'s sources (None when unset), refused when one shares a name with a
    trained source: an evaluation-only source must be one that no row trains."""
    if cfg.eval.heldout is None:
        return None
    mix = load_heldout(cfg.eval.heldout)
    clash = sorted(set(mix.names) & set(trained))
    if clash:
        raise ValueError(
            f"eval.heldout: {clash} are also sources of the training mixture; an evaluation-only "
            "source must be one no row trains (rename it, or drop it from the mixture)"
        )
    return mix


def heldout_fingerprint(path: str | Path) -> str:
    """A digest of an evaluation-only folder's files (sources and ``sources.json``)."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    return config_hash([[p.relative_to(path).as_posix(), sha256_file(p)] for p in files])


def _write_parquet(path: Path, table: pd.DataFrame) -> None:

    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())
