"""The layer-wise rows of the gradient stage (``calibration.layer_groups``) and their readers.

Input: a run config and the gradient stage's model. Output: ``gradients/layers.safetensors`` +
``layers.json`` (one sketched row per source and parameter group, from the same backward pass as
the bank; one part per source in ``gradients/layers_parts/``), and the rows the conflict stage
uses under ``partition.layer_group``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from merit_lab.analysis.layerwise import (
    LayerBank,
    LayerCollector,
    LayerConflict,
    ParamGroup,
    compute_layer_conflict,
    group_spec,
    key_view,
)
from merit_lab.config.schema import RunConfig, config_hash
from merit_lab.gradients.bank import GradientBank
from merit_lab.gradients.estimate import estimate_gradients
from merit_lab.gradients.sketch import sketch_fidelity
from merit_lab.io import atomic_write_bytes, read_json
from merit_lab.models.loading import (
    load_model,
    load_tokenizer,
    resolve_model_path,
    select_parameters,
)
from merit_lab.pipeline.rundir import RunDir, load_run_mixture

__all__ = [
    "LAYER_FIELDS",
    "bank_calibration",
    "conflict_key",
    "conflict_rows",
    "layer_collector",
    "layer_section",
    "layers_current",
    "load_layer_conflict",
    "partition_view",
    "save_layers",
]

log = logging.getLogger(__name__)

LAYER_FIELDS = ("layer_groups", "layer_dim")  # calibration fields that change no bank row


def bank_calibration(cal) -> dict[str, Any]:
    """``calibration`` for the mixture and gradient stage keys: without the layer fields, so
    turning layer groups on neither redoes the bank nor anything after it, and without
    ``lora_warmup_steps`` while it is off (the gradient key adds the LoRA settings when it is
    on), so a run made before the option existed stays current; without ``folds`` and
    ``fold_deal`` (the gradient key adds them when folds > 1: the fold rows are the stage's
    output, the mixture's is not)."""
    drop = (*LAYER_FIELDS, "folds", "fold_deal")
    drop += () if cal.lora_warmup_steps else ("lora_warmup_steps",)
    return key_view(cal, drop)


def partition_view(p) -> dict[str, Any]:
    """``partition`` for the partition stage key: ``layer_group`` already changes conflict.json."""
    return key_view(p, ("layer_group",))


def _source_key(cfg: RunConfig, fingerprint: str, content_key: str) -> str:
    cal = {k: v for k, v in bank_calibration(cfg.calibration).items() if k != "workers"}
    return config_hash(
        "layers",
        cfg.mixture,
        cfg.seed,
        cal,
        cfg.calibration.layer_groups,
        cfg.calibration.layer_dim,
        cfg.sketch,
        cfg.parameters,
        cfg.dtype,
        fingerprint,
        content_key,
    )


def _layers_key(cfg: RunConfig, names: Sequence[str], content: Mapping, fingerprint: str) -> str:
    return config_hash(list(names), [_source_key(cfg, fingerprint, content[n]) for n in names])


def _part_path(run: RunDir, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return run.layer_parts / f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}.safetensors"


def _read_part(run: RunDir, name: str, key: str) -> tuple[np.ndarray, list[dict]] | None:
    path = _part_path(run, name)
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            return f.get_tensor("row").numpy(), json.loads(meta["groups"])
    except Exception as e:  # a part cut short: it is a cache, so redo it
        log.warning("%s: unreadable (%s); computing source %r again", path, e, name)
        return None


def layer_collector(
    cfg: RunConfig,
    run: RunDir,
    model: torch.nn.Module,
    content: Mapping[str, str],
    fingerprint: str,
) -> LayerCollector | None:
    """The ``on_gradient`` hook that writes each computed source's group rows as a part (None
    when ``calibration.layer_groups`` is ``none``).

    Raises:
        ValueError: ``partition.layer_group`` names no group of this model (before any work).
    """
    cal = cfg.calibration
    if cal.layer_groups == "none":
        return None
    par = cfg.parameters
    selected = select_parameters(model, par.include, par.exclude, par.preset)
    params = [(n, tuple(p.shape)) for n, p in selected]
    holder: dict[str, LayerCollector] = {}

    def write(source: str, row: np.ndarray) -> None:
        meta = {
            "key": _source_key(cfg, fingerprint, content[source]),
            "source": source,
            "groups": json.dumps([g.to_dict() for g in holder["c"].groups]),
        }
        payload = save_safetensors({"row": torch.from_numpy(row)}, metadata=meta)
        atomic_write_bytes(_part_path(run, source), payload)

    device = next(model.parameters()).device
    spec = group_spec(cfg.sketch, cal.layer_dim)
    holder["c"] = collector = LayerCollector(params, cal.layer_groups, spec, device, write)
    group = cfg.partition.layer_group
    known = [g.name for g in collector.groups]
    if group and group not in known:
        raise ValueError(
            f"partition.layer_group: no group {group!r} in this model; groups: {known}"
        )
    return collector


def layers_current(
    cfg: RunConfig, run: RunDir, content: Mapping[str, str], fingerprint: str
) -> bool:
    """Whether ``gradients/layers.json`` holds the rows this config asks for (True when it asks
    for none)."""
    if cfg.calibration.layer_groups == "none":
        return True
    if not run.layer_json.is_file():
        return False
    stored = read_json(run.layer_json).get("info", {}).get("key")
    return stored == _layers_key(cfg, list(content), content, fingerprint)


def save_layers(
    cfg: RunConfig,
    run: RunDir,
    bank: GradientBank,
    content: Mapping[str, str],
    fingerprint: str,
) -> LayerBank | None:
    """Assemble and save the layer rows of ``bank``'s sources from their parts; sources without
    a current part (a bank read from parts, a sharded bank) are computed here, one backward
    pass each. Nothing when ``calibration.layer_groups`` is ``none``."""
    if cfg.calibration.layer_groups == "none":
        return None
    names = list(bank.names)
    keys = {n: _source_key(cfg, fingerprint, content[n]) for n in names}
    missing = [n for n in names if _read_part(run, n, keys[n]) is None]
    if missing:
        log.info("layer groups: computing %d source(s) without a current part", len(missing))
        _compute_parts(cfg, run, missing, content, fingerprint)
    parts = {n: _read_part(run, n, keys[n]) for n in names}
    lost = [n for n, p in parts.items() if p is None]
    if lost:
        raise RuntimeError(f"layer parts missing after computing them: {lost}")
    groups = tuple(
        ParamGroup(**{**g, "parameters": tuple(g["parameters"])}) for g in parts[names[0]][1]
    )
    rows = np.stack([parts[n][0] for n in names])
    info = {
        "key": _layers_key(cfg, names, content, fingerprint),
        "grouping": cfg.calibration.layer_groups,
        "layer_dim": cfg.calibration.layer_dim,
        "sketch": group_spec(cfg.sketch, cfg.calibration.layer_dim).to_dict(),
        "bank_key": bank.info.get("key"),
        # the concatenated group rows are another sketch of each whole gradient: how far
        # their cosines are from the bank's is the sketches' own error
        "agreement_with_bank": sketch_fidelity(bank.rows, rows) if len(names) > 1 else {},
    }
    layers = LayerBank(tuple(names), groups, rows, info)
    layers.save(run.gradients)
    return layers


def _compute_parts(
    cfg: RunConfig, run: RunDir, names: list[str], content: Mapping[str, str], fingerprint: str
) -> None:
    model_path = resolve_model_path(cfg.model)
    tok = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    model = load_model(
        model_path, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code
    )
    collector = layer_collector(cfg, run, model, content, fingerprint)
    cal, par = cfg.calibration, cfg.parameters
    estimate_gradients(
        model,
        tok,
        load_run_mixture(cfg),
        sketch=cfg.sketch,
        n=cal.n,
        micro_batch_size=cal.micro_batch_size,
        micro_batch_tokens=cal.micro_batch_tokens,
        gradient_checkpointing=cal.gradient_checkpointing,
        max_length=cal.max_length,
        long_examples=cfg.mixture.long_examples,
        preset=par.preset,
        include=par.include,
        exclude=par.exclude,
        sources=names,
        model_fingerprint=fingerprint,
        save_bank=False,
        on_gradient=collector,
    )


def conflict_key(cfg: RunConfig, run: RunDir) -> str | None:
    """The conflict stage's input key: the bank's, or with ``partition.layer_group`` the bank's
    plus that group and the layer rows' key."""
    bank_key = run.stored_key("gradients")
    group = cfg.partition.layer_group
    if not group:
        return bank_key
    if not run.layer_json.is_file():
        raise FileNotFoundError(
            f"partition.layer_group: {run.layer_json} is missing; run the "
            "gradients stage with calibration.layer_groups set"
        )
    return f"{bank_key}+{group}@{read_json(run.layer_json)['info']['key']}"


def conflict_rows(cfg: RunConfig, run: RunDir) -> tuple[tuple[str, ...], np.ndarray]:
    """(names, rows) the conflict space is computed from: the bank (its rows memory-mapped,
    read in column blocks by `compute_conflict_space`), or one layer group's rows."""
    bank = run.load_bank(mmap=True)
    group = cfg.partition.layer_group
    if not group:
        return bank.names, bank.rows
    layers = LayerBank.load(run.gradients).select(bank.names)
    return bank.names, layers.group_rows(group)


def load_layer_conflict(run_dir: str | Path, k: int = 2) -> LayerConflict:
    """The run's `LayerConflict`, with a contrast for every metadata label that takes exactly
    two values over the sources (the demo's style, case and wording)."""
    run = RunDir(Path(run_dir))
    if not run.layer_json.is_file():
        raise FileNotFoundError(
            f"{run.layer_json}: no layer rows; set calibration.layer_groups and run gradients"
        )
    layers = LayerBank.load(run.gradients)
    meta = {s["name"]: s.get("metadata", {}) for s in run.read_mixture()["sources"]}
    labels: dict[str, list] = {}
    for key in sorted({k for n in layers.names for k in meta.get(n, {})}):
        values = [meta.get(n, {}).get(key) for n in layers.names]
        if all(isinstance(v, (str, int, bool)) for v in values) and len(set(values)) == 2:
            labels[key] = values
    return compute_layer_conflict(layers, k=k, contrasts=labels)


def layer_section(run_dir: str | Path, figure=None) -> list[str]:
    """The report's "Layer-wise conflict" section (nothing without layer rows): the groups
    carrying most of each conflict axis; ``figure(fig, stem)`` saves a figure, returns its link."""
    run = RunDir(Path(run_dir))
    if not run.layer_json.is_file():
        return []
    import pandas as pd

    from merit_lab.pipeline.markdown import markdown_table

    lc = load_layer_conflict(run.root)
    table = pd.DataFrame(lc.summary()).set_index("group").drop(columns=["kind", "layer"])
    agree = LayerBank.load(run.gradients).info.get("agreement_with_bank", {})
    lines = [
        "## Layer-wise conflict",
        "",
        "Each group's share of a conflict axis v (vᵀC_k v / vᵀC v: the part of the conflict "
        "along v its inner products carry; a column sums to 1) and how well its own PC1 "
        "follows the whole model's (|Pearson|). "
        f"The group sketches' whole cosines agree with the bank's to "
        f"{agree.get('max_abs_error', float('nan')):.3f} at most.",
        "",
        markdown_table(table, fmt="{:.3f}"),
        "",
    ]
    if figure is not None:
        from merit_lab.viz.plots_layers import plot_layer_axis_shares, plot_layer_cosines

        lines += [
            figure(plot_layer_axis_shares(lc), "layer_axis_shares"),
            figure(plot_layer_cosines(lc), "layer_cosines"),
            "",
        ]
    return lines
