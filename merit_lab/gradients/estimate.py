"""The gradient estimator: one gradient per source at the base model θ0, kept as a sketch.

Input: a model, its tokenizer and a `Mixture`. Output: a `GradientBank` of T sketched rows
(`merit_lab.gradients.bank`), one finished source at a time (micro-batched, optionally
checkpointed), so a killed run keeps what it finished and a larger mixture computes only its new
sources.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from merit_lab.config.schema import CalibrationConfig, MixtureConfig
from merit_lab.data.formatting import (
    collate,
    count_response_tokens,
    response_token_loss,
    tokenize_examples,
)
from merit_lab.data.mixture import Mixture
from merit_lab.gradients.bank import BankParts, GradientBank, bank_key, request_info
from merit_lab.gradients.batching import (
    call_price,
    check_deal,
    fold_batches,
    fold_batching,
    fold_batching_cost,
)
from merit_lab.gradients.sketch import SketchSpec, build_sketch
from merit_lab.models.cpu_memory import keep_freed_memory
from merit_lab.models.loading import select_parameters

__all__ = [
    "NonFiniteLossError",
    "checkpointed",
    "estimate_gradients",
    "grads_only_for",
    "source_gradient",
]


@contextlib.contextmanager
def grads_only_for(
    model: torch.nn.Module, selected: Sequence[tuple[str, Tensor]]
) -> Iterator[None]:
    """Inside, only the ``selected`` parameters require grad (backward skips the rest); on exit
    ``.grad`` is cleared and every parameter's ``requires_grad`` flag is restored."""
    chosen = {id(p) for _, p in selected}
    flags = {nm: p.requires_grad for nm, p in model.named_parameters()}
    for _, p in model.named_parameters():
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        model.zero_grad(set_to_none=True)
        for nm, p in model.named_parameters():
            p.requires_grad_(flags[nm])


def source_gradient(
    model: torch.nn.Module,
    examples: Sequence,
    *,
    pad_token_id: int,
    micro_batch_size: int = CalibrationConfig.micro_batch_size,
    micro_batch_tokens: int | None = None,
    after_backward: Callable[[float], None] | None = None,
    folds: int = 1,
    after_fold: Callable[[int, int], None] | None = None,
    progress: bool = False,
    fold_deal: str = CalibrationConfig.fold_deal,
) -> tuple[float, int]:
    """Accumulate into ``.grad`` the gradient of the mean response-token loss over ``examples``.

    Each micro-batch's summed cross-entropy is divided by the total number of response tokens
    of all examples before ``backward`` (`response_token_loss` with ``num_items``), so the
    accumulated gradient equals the full-batch gradient of the mean (not a mean of per-batch
    means).

    Args:
        examples: `TokenizedExample`s.
        micro_batch_size, micro_batch_tokens: the micro-batches (`batching.micro_batches`): the
            fewest on a GPU; on the CPU as many more as save padding, a batch priced at
            `batching.CPU_CALL_TOKENS` padded tokens.
        after_backward: called with each micro-batch's loss share after its backward (e.g. to
            sketch and clear ``.grad``, so half-precision gradients are summed in float32).
        folds, fold_deal: this many folds, one after another, dealt by example or by whole
            micro-batch (`batching.fold_batches`).
        after_fold: called as (fold, its response tokens) once a fold's micro-batches are all
            in ``.grad``: it then holds the sum over folds 0..fold.

    Returns:
        (mean loss, number of response tokens).
    """
    # on the CPU a batch is formed where it saves more padding than a call costs
    price = call_price(next(model.parameters()).device.type)
    batches = [
        [collate(b, pad_token_id) for b in fold]
        for fold in fold_batches(
            examples,
            folds,
            size=micro_batch_size,
            tokens=micro_batch_tokens,
            deal=fold_deal,
            call_tokens=price,
        )
    ]
    tokens = [sum(count_response_tokens(b["labels"]) for b in fold) for fold in batches]
    total = sum(tokens)
    if total == 0:
        raise ValueError("no response tokens to compute a loss on")
    if 0 in tokens:
        raise ValueError(f"fold {tokens.index(0)} of {folds} has no response tokens")
    loss = 0.0
    bar = tqdm(
        total=sum(map(len, batches)), desc="micro-batches", leave=False, disable=not progress
    )
    with bar:
        for f, fold in enumerate(batches):
            for b in fold:
                part = response_token_loss(model, b, num_items=total)
                part.backward()
                value = float(part.detach())
                loss += value
                if after_backward is not None:
                    after_backward(value)
                bar.update()
            if after_fold is not None:
                after_fold(f, tokens[f])
    return loss, total


@contextlib.contextmanager
def checkpointed(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside, activations are recomputed in backward (transformers' gradient checkpointing,
    non-reentrant): memory for one layer's activations instead of all. Only the checkpointed
    layers are put in training mode (transformers checkpoints a layer only then); dropout and
    every other module stay in eval mode, so the gradient is the same as without."""
    layers = []
    if enabled:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"{type(model).__name__} does not support gradient checkpointing; set "
                "calibration.gradient_checkpointing: false"
            )
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
        for m in layers:
            m.training = True  # this module only, not its children (dropout stays off)
    try:
        yield
    finally:
        if enabled:
            for m in layers:
                m.training = False
            disable = getattr(model, "activation_checkpointing_disable", None)
            (disable or model.gradient_checkpointing_disable)()


class NonFiniteLossError(FloatingPointError, ValueError):
    """The loss at θ0 is NaN or inf: a ValueError too, so the command prints it as one line."""


def _non_finite_message(model: torch.nn.Module, name: str, loss: float) -> str:
    """Why a source's loss at θ0 is not finite: θ0's own non-finite weights, named, or else
    an overflow of the dtype."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    where = getattr(getattr(model, "config", None), "_name_or_path", "") or "θ0"
    if bad:
        return (
            f"source {name!r}: loss at θ0 is {loss}: θ0 ({where}) has non-finite weights in "
            f"{bad[:5]} ({len(bad)} tensor(s)); use a base model whose weights are finite"
        )
    return (
        f"source {name!r}: loss at θ0 is {loss} though θ0's weights are finite; the dtype "
        "may overflow: try dtype: float32"
    )


def _bank_info(
    model: torch.nn.Module,
    selected: Sequence[tuple[str, Tensor]],
    sketch: SketchSpec,
    *,
    n: int,
    max_length: int,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    preset: str,
    model_fingerprint: str,
    long_examples: str,
    lora: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """What the rows depend on, and its hash as ``key``."""
    info = {
        **request_info(
            sketch=sketch,
            n=n,
            max_length=max_length,
            long_examples=long_examples,
            preset=preset,
            include=include,
            exclude=exclude,
            model_fingerprint=model_fingerprint,
            lora=lora,
        ),
        "n_parameters": int(sum(p.numel() for _, p in selected)),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    return {**info, "key": bank_key(info)}


def _tokenized(
    todo: Sequence[int], tokenize: Callable[[int], list], prefetch: bool
) -> Iterator[tuple[int, list]]:
    """(i, tokenised examples) for each source index in ``todo``, in order.

    With ``prefetch`` the next source is tokenised on a thread while the caller works on this
    one. Tokenising through the chat template costs ~10% of a CPU fwd+bwd on the demo and far
    more beside a GPU's, where the CPU is otherwise idle; on the CPU the cores are already busy
    with the fwd+bwd, and a thread only contends (measured).
    """
    if not prefetch:
        for i in todo:
            yield i, tokenize(i)
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
    try:
        ahead = pool.submit(tokenize, todo[0]) if todo else None
        for j, i in enumerate(todo):
            examples = ahead.result()
            ahead = pool.submit(tokenize, todo[j + 1]) if j + 1 < len(todo) else None
            yield i, examples
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _sketch_source(
    model: torch.nn.Module,
    sk,
    selected: Sequence[tuple[str, Tensor]],
    examples: list,
    name: str,
    pad_token_id: int,
    *,
    micro_batch_size: int,
    micro_batch_tokens: int | None = None,
    on_gradient: Callable[[str, Sequence[tuple[str, Tensor]]], None] | None = None,
    folds: int = 1,
    fold_deal: str = CalibrationConfig.fold_deal,
) -> tuple[np.ndarray, dict[str, Any], np.ndarray | None]:
    """One source's sketched gradient (d,) float32, its stats and (m, d) fold rows (None for
    one fold), sketched right after backward.

    The micro-batch gradients are summed in ``.grad`` (the model's dtype) and sketched once into
    the float32 row. For a bfloat16 model, summing each micro-batch's sketch in float32 instead
    changed the cosine to the exact float32 gradient by < 1% of its own error (the bf16
    forward's), at twice the GPU time (`benchmarks/bench_precision.py`, `bench_gpu.py`).

    With m = ``folds`` > 1 the folds run one after another and ``.grad`` after fold f (the sum
    over folds 0..f) is sketched too (S_f, by `GradientSketch.sketch_parallel` on every core;
    S_{m-1} is the row, so m − 1 extra sketch passes and no extra forward, backward or norm);
    fold row f = (S_f − S_{f−1}) · N / N_f in float64, rounded once to float32 (N_f: the fold's
    response tokens, N their sum), the gradient of the mean loss over fold f alone.
    ``stats["fold_seconds"]`` is the time of the extra passes; ``stats["micro_batches"]`` the
    calls and padded tokens of the micro-batches, and of one fold's (`fold_batching_cost`).
    """
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    partial: list[np.ndarray] = []  # S_0 .. S_{m-2}
    fold_tokens: list[int] = []
    fold_seconds = 0.0

    def after_fold(f: int, n_f: int) -> None:
        nonlocal fold_seconds
        fold_tokens.append(n_f)
        if f < folds - 1:
            t = time.perf_counter()
            # every core (the forward and backward use them all); checked once, by the row's
            # pass over the full sum
            s = sk.sketch_parallel((n, p.grad) for n, p in selected if p.grad is not None)
            partial.append(s.cpu().numpy().astype(np.float64))
            fold_seconds += time.perf_counter() - t

    loss, n_tokens = source_gradient(
        model,
        examples,
        pad_token_id=pad_token_id,
        micro_batch_size=micro_batch_size,
        micro_batch_tokens=micro_batch_tokens,
        folds=folds,
        fold_deal=fold_deal,
        after_fold=after_fold if folds > 1 else None,
    )
    if not np.isfinite(loss):
        raise NonFiniteLossError(_non_finite_message(model, name, loss))
    row = sk.zeros()
    sq = 0.0  # the exact gradient's squared norm, read in the sketch's own pass
    for pname, p in selected:
        if p.grad is None:  # a parameter this loss does not reach contributes zero
            continue
        sq += sk.add_(row, pname, p.grad, square_norm=True)
    if on_gradient is not None:  # e.g. layerwise.LayerCollector: more sketches of this .grad
        on_gradient(name, selected)
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    row = row.detach().cpu().numpy()
    stats = {
        "n_examples": len(examples),
        "n_response_tokens": n_tokens,
        "n_tokens": sum(ex.n_tokens for ex in examples),
        "loss": loss,
        "grad_norm": math.sqrt(sq),
        "seconds": time.perf_counter() - t0,
    }
    if folds == 1:
        return row, stats, None
    cumulative = np.stack([np.zeros(row.shape), *partial, row.astype(np.float64)])
    scale = n_tokens / np.asarray(fold_tokens, dtype=np.float64)
    fold_rows = (np.diff(cumulative, axis=0) * scale[:, None]).astype(np.float32)
    kw = dict(size=micro_batch_size, tokens=micro_batch_tokens, deal=fold_deal)
    batches = fold_batching_cost(examples, folds, **kw, call_tokens=call_price(device.type))
    stats |= {"fold_tokens": fold_tokens, "fold_seconds": fold_seconds, "micro_batches": batches}
    batching = fold_batching(folds, micro_batch_size, micro_batch_tokens, fold_deal)
    if batching is not None:  # the folds' examples depend on the micro-batching
        stats["fold_batching"] = batching
    return row, stats, fold_rows


def estimate_gradients(
    model: torch.nn.Module,
    tokenizer,
    mixture: Mixture,
    *,
    sketch: SketchSpec | None = None,
    n: int = CalibrationConfig.n,
    micro_batch_size: int = CalibrationConfig.micro_batch_size,
    micro_batch_tokens: int | None = CalibrationConfig.micro_batch_tokens,
    gradient_checkpointing: bool = CalibrationConfig.gradient_checkpointing,
    max_length: int = CalibrationConfig.max_length,
    long_examples: str = MixtureConfig.long_examples,
    preset: str = "all",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    sources: Sequence[str] | None = None,
    model_fingerprint: str = "",
    source_keys: Mapping[str, str] | None = None,
    save_bank: bool = True,
    progress: bool = True,
    prefetch: bool | None = None,
    on_gradient: Callable[[str, Sequence[tuple[str, Tensor]]], None] | None = None,
    lora: Mapping[str, Any] | None = None,
    folds: int = 1,
    fold_deal: str = CalibrationConfig.fold_deal,
) -> GradientBank:
    """Estimate one sketched gradient per source at the model's current weights θ0.

    The gradient of each source is the gradient of the mean response-token loss over its first
    ``n`` calibration examples, accumulated over micro-batches; it is sketched parameter by
    parameter right after ``backward``, so memory holds one model gradient and T × d floats,
    never T × params. A bfloat16/float16 model's gradient is sketched into float32 rows.

    With ``out_dir``, each finished source is written to ``out_dir/parts/`` at once and
    reused on the next call with the same settings (resume after a kill; incremental addition
    of sources; several workers each computing some sources, `merit_lab.gradients.workers`), and
    the assembled bank is saved to ``out_dir`` (unless ``save_bank`` is false: a worker).

    Args:
        sketch: sketch kind/dim/seed (default: count-sketch at the default dimension).
        n: calibration examples per source (fewer if the source has fewer): the first ``n``
            that the ``long_examples`` policy keeps (`formatting.tokenize_example`).
        micro_batch_size, micro_batch_tokens: examples per forward/backward, or padded tokens
            per forward/backward (`batching.micro_batches`).
        gradient_checkpointing: recompute activations in backward (`checkpointed`).
        preset, include, exclude: the parameters (see `select_parameters`).
        sources: the sources to include (default: all of ``mixture``), in row order.
        model_fingerprint: identifies θ0 so parts from another model are never reused.
        source_keys: per source, a key of its examples (e.g. a content hash): a part is reused
            only when its source's key is unchanged, so an edited source is redone alone.
        prefetch: tokenise the next source on a thread during this one's fwd+bwd (default:
            on for GPUs, off on the CPU, where it only contends for the cores).
        on_gradient: called as (source, selected) while ``.grad`` holds a computed source's
            summed gradient (`merit_lab.analysis.layerwise`); not called for a source read from
            parts.
        lora: a LoRA bank (the LESS way): ``model`` carries a warmed-up adapter
            (`merit_lab.gradients.lora_bank.load_lora_model`) and the rows are the gradients of
            its A and B matrices only (preset/include/exclude do not apply); this dict (the
            adapter's `warmup_info`) goes into the bank info and key.
        folds: deal each source's calibration examples into this many folds
            (`batching.fold_batches`) and keep each fold's gradient too (``bank.folds``,
            `_sketch_source`): m − 1 more sketch passes per source, nothing else. The rows are
            the same gradient as with one fold, to float rounding (the summation order only), so
            the bank key does not include it; a part is reused for m > 1 only when it holds m
            fold rows dealt alike. Every source needs at least m calibration examples (checked
            before any work). The library's default is 1; a run's is ``calibration.folds``.
        fold_deal: "examples" (i mod m) or whole micro-"batches" (`batching.fold_batches`;
            ``calibration.fold_deal``).

    Returns:
        The bank, rows in the order of ``sources``; ``info["throughput"]`` holds the tokens,
        seconds and tokens/s of the sources computed in this call.
    """
    sketch = sketch or SketchSpec()
    names = tuple(sources) if sources is not None else mixture.names
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    check_deal(fold_deal)
    # a source without any example is named by the tokeniser below; too few for m folds, here
    few = {s: k for s in names if 0 < (k := min(n, len(mixture[s].calibration))) < folds}
    if few:
        raise ValueError(
            f"calibration.folds = {folds} needs at least {folds} calibration examples per "
            f"source; {len(few)} source(s) have fewer: {dict(list(few.items())[:8])}. Lower "
            "calibration.folds (1 turns folds off) or give them more examples"
        )
    if lora:
        from merit_lab.gradients.lora_bank import lora_parameters

        selected = lora_parameters(model)
    else:
        selected = select_parameters(model, include, exclude, preset)
    device = next(model.parameters()).device
    info = _bank_info(
        model,
        selected,
        sketch,
        n=n,
        max_length=max_length,
        include=include,
        exclude=exclude,
        preset=preset,
        model_fingerprint=model_fingerprint,
        long_examples=long_examples,
        lora=lora,
    )
    sk = build_sketch(sketch, [(nm, tuple(p.shape)) for nm, p in selected], device=device)
    parts = None
    if out_dir is not None:
        parts = BankParts(Path(out_dir) / "parts", info["key"], source_keys or {})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Rows go straight into the bank's array: memory holds the bank once (plus one model
    # gradient), not a list of rows and a stacked copy.
    rows = np.empty((len(names), sk.dim), dtype=np.float32)
    fold_rows = np.empty((len(names), folds, sk.dim), dtype=np.float32) if folds > 1 else None
    batching = fold_batching(folds, micro_batch_size, micro_batch_tokens, fold_deal)
    stats: dict[str, dict] = {}
    for i, name in enumerate(names):  # parts a killed run already finished are reused
        cached = parts.read(name, folds, batching) if parts is not None else None
        if cached is not None:
            rows[i], stats[name] = cached
            if fold_rows is not None:
                fold_rows[i] = parts.read_folds(name, folds, batching)[0]
    todo = [i for i, name in enumerate(names) if name not in stats]

    def tokenize(i: int) -> list:
        calib = mixture[names[i]].calibration
        toks = tokenize_examples(tokenizer, calib, max_length, long_examples, limit=n)
        if not toks:
            kept = " kept by mixture.long_examples: skip" if calib else ""
            raise ValueError(f"source {names[i]!r} has no calibration examples{kept}")
        if len(toks) < folds:
            raise ValueError(
                f"source {names[i]!r}: {len(toks)} calibration examples kept by "
                f"mixture.long_examples, fewer than calibration.folds = {folds}"
            )
        return toks

    stream = _tokenized(todo, tokenize, device.type != "cpu" if prefetch is None else prefetch)
    bar = tqdm(
        total=len(names),
        initial=len(names) - len(todo),
        desc="source gradients",
        unit="source",
        disable=not progress,
    )
    done = {"tokens": 0, "seconds": 0.0}
    with (
        grads_only_for(model, selected),
        checkpointed(model, gradient_checkpointing),
        keep_freed_memory(device),  # on the CPU: each call's gradients reuse freed pages
        contextlib.closing(stream),
        bar,
    ):
        for i, examples in stream:
            row, stats[names[i]], fold = _sketch_source(
                model,
                sk,
                selected,
                examples,
                names[i],
                pad_id,
                micro_batch_size=micro_batch_size,
                micro_batch_tokens=micro_batch_tokens,
                on_gradient=on_gradient,
                folds=folds,
                fold_deal=fold_deal,
            )
            if parts is not None:
                parts.write(names[i], row, stats[names[i]], fold)
            rows[i] = row
            if fold_rows is not None:
                fold_rows[i] = fold
            done["tokens"] += stats[names[i]]["n_tokens"]
            done["seconds"] += stats[names[i]]["seconds"]
            bar.set_postfix_str(f"{names[i]}, {done['tokens'] / done['seconds']:,.0f} tok/s")
            bar.update()
    stats = {name: stats[name] for name in names}  # row order, cached or not
    throughput = {
        **done,
        "sources": len(todo),
        "device": str(device),
        "tokens_per_s": done["tokens"] / done["seconds"] if done["seconds"] else None,
    }
    fold_tokens = None
    if fold_rows is not None:
        fold_tokens = np.array([stats[s]["fold_tokens"] for s in names], dtype=np.int64)
    info = {**info, "throughput": throughput}
    bank = GradientBank(names, rows, info, stats, fold_rows, fold_tokens)
    if out_dir is not None and save_bank:
        bank.save(out_dir)
    return bank
