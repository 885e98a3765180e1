"""Calibration-size check: how many examples pin down a source's gradient direction.

Input: a model, its tokenizer and a source's calibration examples. Output: a DataFrame of the
cosine between the gradient of bootstrap samples of n examples and the gradient of all of them,
from one sketched gradient per example (so each bootstrap sample costs no backward pass).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from merit_lab.config.schema import CalibrationConfig, MixtureConfig
from merit_lab.data.formatting import tokenize_examples
from merit_lab.gradients.estimate import grads_only_for, source_gradient
from merit_lab.gradients.sketch import SketchSpec, build_sketch
from merit_lab.models.cpu_memory import keep_freed_memory
from merit_lab.models.loading import select_parameters

__all__ = ["bootstrap_convergence", "gradient_convergence", "sketch_example_gradients"]

log = logging.getLogger(__name__)

DEFAULT_NS = (10, 20, 40, 80, 160, 200)


def sketch_example_gradients(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[dict],
    *,
    sketch: SketchSpec | None = None,
    max_length: int = CalibrationConfig.max_length,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    progress: bool = False,
    preset: str = "all",
    long_examples: str = MixtureConfig.long_examples,
) -> tuple[np.ndarray, np.ndarray]:
    """One sketched gradient per example: the gradient of its mean response-token loss.

    Examples go through the model one at a time (a batch's backward sums its examples, so
    per-example gradients need batches of one); each gradient is sketched right after its
    backward, so memory holds one model gradient and N × dim floats.

    Why the pooled gradient is exact: with g_i the gradient of example i's mean loss and n_i its
    response tokens, the gradient of the pooled mean loss over a set S (what
    ``estimate_gradients`` computes) is Σ_{i∈S} n_i g_i / Σ_{i∈S} n_i, and the sketch S(·) is
    linear, so S(that) = Σ n_i S(g_i) / Σ n_i: the token-weighted mean of these rows equals the
    bank row of S, up to float32 rounding.

    Args:
        examples: normalised chat examples (``{"messages": [...]}``).
        sketch: the map (default: count-sketch at the default width); use the bank's spec to
            compare with bank rows.
        include, exclude, preset: the parameters (see ``select_parameters``).
        long_examples: the over-long policy (``skip`` leaves such examples out: pass
            `merit_lab.data.formatting.kept_examples` to keep rows aligned with examples).

    Returns:
        (rows, tokens): (N, dim) float32 sketched gradients and (N,) int64 response-token counts.
    """
    sketch = sketch or SketchSpec()
    if not examples:
        raise ValueError("no examples")
    selected = select_parameters(model, include, exclude, preset)
    device = next(model.parameters()).device
    sk = build_sketch(sketch, [(nm, tuple(p.shape)) for nm, p in selected], device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokenized = tokenize_examples(tokenizer, examples, max_length, long_examples)

    rows = np.zeros((len(tokenized), sk.dim), dtype=np.float32)
    tokens = np.zeros(len(tokenized), dtype=np.int64)
    with grads_only_for(model, selected), keep_freed_memory(device):
        for i, ex in enumerate(tqdm(tokenized, desc="example gradients", disable=not progress)):
            model.zero_grad(set_to_none=True)
            _, tokens[i] = source_gradient(model, [ex], pad_token_id=pad_id, micro_batch_size=1)
            row = sk.sketch((nm, p.grad) for nm, p in selected if p.grad is not None)
            rows[i] = row.detach().cpu().numpy()
    return rows, tokens


def bootstrap_convergence(
    rows: np.ndarray,
    tokens: np.ndarray,
    *,
    ns: Sequence[int] = DEFAULT_NS,
    n_boot: int = 20,
    seed: int = 0,
    replace: bool = True,
) -> pd.DataFrame:
    """Cosine between the pooled gradient of n resampled examples and that of all N.

    Pooled gradients are token-weighted means of the rows (see ``sketch_example_gradients``).
    With ``replace=True`` (the bootstrap) a sample of n examples is drawn with replacement, so
    n = N still shows how much the full estimate would move on another draw of N examples;
    with ``replace=False`` it is a subsample and n = N gives exactly 1.

    Args:
        rows: (N, dim) per-example gradients (sketched or exact).
        tokens: (N,) response tokens per example (the pooling weights).
        ns: sample sizes; those above N are left out (with a warning).
        n_boot: samples per size.
        seed: seeds the resampling.

    Returns:
        Columns ``n``, ``boot``, ``cosine``: one row per (n, sample).
    """
    x = np.asarray(rows, dtype=np.float64)
    w = np.asarray(tokens, dtype=np.float64)
    big_n = x.shape[0]
    if x.ndim != 2 or w.shape != (big_n,):
        raise ValueError(f"need (N, dim) rows and (N,) tokens, got {x.shape} and {w.shape}")
    if np.any(w <= 0):
        raise ValueError("every example needs at least one response token")
    kept = sorted({int(n) for n in ns if 1 <= int(n) <= big_n})
    if len(kept) < len(set(ns)):
        log.warning(
            "sizes %s exceed the %d examples (or are < 1); left out",
            sorted(set(ns) - set(kept)),
            big_n,
        )
    if not kept:
        raise ValueError(f"no sample size in {list(ns)} is within 1..{big_n}")
    full = w @ x / w.sum()
    full_norm = np.linalg.norm(full)
    if full_norm == 0:
        raise ValueError("the gradient of all examples is zero")
    rng = np.random.default_rng(seed)
    records = []
    for n in kept:
        counts = np.zeros((n_boot, big_n))
        for b in range(n_boot):
            idx = rng.choice(big_n, size=n, replace=replace)
            np.add.at(counts[b], idx, 1.0)
        cw = counts * w[None, :]
        pooled = cw @ x / cw.sum(axis=1, keepdims=True)
        cos = pooled @ full / (np.linalg.norm(pooled, axis=1) * full_norm)
        records += [(n, b, float(c)) for b, c in enumerate(np.clip(cos, -1.0, 1.0))]
    return pd.DataFrame(records, columns=["n", "boot", "cosine"])


def gradient_convergence(
    model: torch.nn.Module,
    tokenizer,
    source_examples: Sequence[dict] | Mapping[str, Sequence[dict]],
    ns: Sequence[int] = DEFAULT_NS,
    n_boot: int = 20,
    seed: int = 0,
    max_length: int = CalibrationConfig.max_length,
    *,
    sketch: SketchSpec | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    replace: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Is n calibration examples enough? Cosine of n-example gradients with the all-example one.

    Costs one forward + backward per example (per source), then bootstraps in sketch space.
    Plot the result with ``plots.plot_gradient_convergence``.

    Args:
        source_examples: one source's calibration examples, or source name → examples.
        ns, n_boot, seed, replace: see ``bootstrap_convergence``.
        max_length: token truncation, as in the gradient stage.
        sketch, include, exclude: see ``sketch_example_gradients``.

    Returns:
        Columns ``n``, ``boot``, ``cosine`` (and ``source`` first when given a mapping).
    """
    named = isinstance(source_examples, Mapping)
    groups = source_examples if named else {"": source_examples}
    frames = []
    for name, examples in groups.items():
        rows, tokens = sketch_example_gradients(
            model,
            tokenizer,
            list(examples),
            sketch=sketch,
            max_length=max_length,
            include=include,
            exclude=exclude,
            progress=progress,
        )
        df = bootstrap_convergence(rows, tokens, ns=ns, n_boot=n_boot, seed=seed, replace=replace)
        if named:
            df.insert(0, "source", name)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)
