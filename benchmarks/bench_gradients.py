"""Gradient bank against its physical limit: a plain training forward+backward.

Measured on the demo base and the demo mixture (32 sources) with the calibration settings of
``configs/demo.yaml`` (n = 200 examples per source, micro-batches of 50, max length 256):

* **stage / plain**: tokens/s of ``estimate_gradients`` (the whole stage: tokenising, response-
  only loss, backward, count-sketch, finite checks) against a plain training forward+backward
  (the model's own loss, ``loss.backward()``) over the same pre-collated micro-batches. The
  plain pass is the floor: the stage cannot compute a gradient with less work. Target ≥ 0.9×.
* **sketch share**: seconds to count-sketch one source's gradient (every parameter, as the stage
  does it) over the stage's seconds per source. Target ≤ 10%.
* **scaling in T**: the stage on T = 8 … 128 sources (copies of the demo's under new names,
  n = 50), each T in a fresh process: seconds per calibration token should stay constant (the
  demo's sources differ in length, so per source they need not) and peak memory should grow
  only by the bank itself (T × 4 × dim bytes), never by T × parameters.
* **per-example (the LESS way)**: one backward and one sketch per example, averaged, against
  the batched stage on the same sources. For reference; no target.
* **fold sketches** (``calibration.folds``, 4 by default): the m − 1 extra sketch passes per
  source, as the stage times them (``stats["fold_seconds"]``), over the stage's seconds; and the
  stage with folds over the stage without (wall, alternating rounds, medians: it also holds the
  micro-batches formed within each fold). Target ≤ 5% for both.
* **one pass** over SmolLM2's shapes (134.5M coordinates, random gradients, no model needed):
  the fold pass as it was (intra-op threads on each chunk's bitwise ops), the row pass and the
  fold pass (``sketch_parallel``) as they are; wall and CPU seconds. For reference; no target.

Run: python -m benchmarks.bench_gradients [--quick] [--out bench-gradients.json]
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    Results,
    bench_main,
    in_child,
    peak_rss,
    rel_slope_spread,
    reset_peak_rss,
)
from merit_lab.config.schema import CalibrationConfig, load_config
from merit_lab.data.formatting import collate, tokenize_examples
from merit_lab.data.mixture import Mixture, load_mixture
from merit_lab.gradients.estimate import estimate_gradients, source_gradient
from merit_lab.gradients.sketch import DEFAULT_SKETCH_DIM, SketchSpec, build_sketch
from merit_lab.models.cpu_memory import keep_freed_memory
from merit_lab.models.loading import load_model, load_tokenizer, select_parameters

SECTION = "gradient bank"
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _log(msg: str) -> None:
    print(f"[gradients] {msg}", file=sys.stderr, flush=True)


def _setup(n_sources: int | None = None):
    tok, model = load_tokenizer("demo"), load_model("demo", device="cpu")
    mix = load_mixture("demo")
    if n_sources is not None:
        mix = mix.select(mix.names[:n_sources])
    return tok, model, mix


def _replicated(mix: Mixture, t: int) -> Mixture:
    """``t`` sources cycling through ``mix``'s, renamed so every name is unique."""
    srcs = [
        dataclasses.replace(mix.sources[i % len(mix)], name=f"{mix.names[i % len(mix)]}~{i}")
        for i in range(t)
    ]
    return Mixture(tuple(srcs), mix.origin, mix.seed, mix.info)


def stage_rounds(
    model,
    tok,
    mix: Mixture,
    cal: CalibrationConfig,
    n: int,
    rounds: int,
    deals: tuple[str, ...] = ("examples",),
) -> dict:
    """Alternating rounds of the gradient stage with ``cal.folds`` folds and without (folds 1):
    per round the wall seconds of each and the seconds of the extra fold sketch passes, under
    each ``calibration.fold_deal`` of ``deals`` ("with_s" and "fold_s" for examples dealt,
    "with_batches_s" and "fold_batches_s" for whole batches)."""
    key = {d: "" if d == "examples" else f"_{d}" for d in deals}
    out: dict[str, list[float]] = {"without_s": []}
    for d in deals:
        out |= {f"with{key[d]}_s": [], f"fold{key[d]}_s": []}
    kw = dict(n=n, micro_batch_size=cal.micro_batch_size, max_length=cal.max_length)
    runs = [(cal.folds, d) for d in deals] + [(1, "examples")]
    for rep in range(rounds):
        for folds, deal in runs if rep % 2 == 0 else runs[::-1]:
            t0 = time.perf_counter()
            bank = estimate_gradients(
                model, tok, mix, folds=folds, fold_deal=deal, progress=False, **kw
            )
            wall = time.perf_counter() - t0
            if folds == 1:
                out["without_s"].append(wall)
                continue
            out[f"with{key[deal]}_s"].append(wall)
            out[f"fold{key[deal]}_s"].append(sum(st["fold_seconds"] for st in bank.stats.values()))
        done = [
            f"with ({d}) {out[f'with{key[d]}_s'][-1]:.1f} s, fold sketches "
            f"{out[f'fold{key[d]}_s'][-1]:.2f} s"
            for d in deals
        ]
        _log(f"  folds round {rep + 1}: {', '.join(done)}, without {out['without_s'][-1]:.1f} s")
    return out


def add_fold_figures(
    res: Results,
    section: str,
    r: dict,
    folds: int,
    note: str = "",
    n: int | None = None,
    deal: str = "examples",
) -> None:
    """The two fold-cost figures of `stage_rounds` (medians; the notes give the spread), named
    with the calibration ``n`` where one section holds them at two, and with the deal when not
    by example."""
    at = "" if n is None else f" at n = {n}"
    key = "" if deal == "examples" else f"_{deal}"
    dealt = "" if deal == "examples" else f", whole {deal} dealt"
    share = [100 * f / w for f, w in zip(r[f"fold{key}_s"], r[f"with{key}_s"], strict=True)]
    ratio = [w / o for w, o in zip(r[f"with{key}_s"], r["without_s"], strict=True)]
    res.add(
        section,
        f"fold sketches ({folds} folds{dealt}) ÷ gradient stage{at}",
        float(np.median(share)),
        "%",
        target=("<=", 5.0),
        note=f"{min(share):.1f}-{max(share):.1f}% over {len(share)} rounds{note}",
    )
    formed = "formed within each fold" if deal == "examples" else "the source's fewest, dealt"
    res.add(
        section,
        f"stage with folds{dealt} ÷ stage without (wall){at}",
        100 * (float(np.median(ratio)) - 1),
        "% more",
        target=("<=", 5.0),
        note=f"{100 * (min(ratio) - 1):.1f} to {100 * (max(ratio) - 1):.1f}%; with the "
        f"micro-batches {formed}",
    )


def smollm2_shapes(layers: int = 30, vocab: int = 49152) -> list[tuple[str, tuple[int, ...]]]:
    """SmolLM2-135M's parameter shapes (134.5M coordinates at the defaults; tied embeddings)."""
    h, kv, mlp = 576, 192, 1536
    per_layer = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (mlp, h)}
    per_layer |= {"up": (mlp, h), "down": (h, mlp), "norm1": (h,), "norm2": (h,)}
    shapes = [("embed", (vocab, h))]
    shapes += [(f"layers.{i}.{k}", s) for i in range(layers) for k, s in per_layer.items()]
    return [*shapes, ("norm", (h,))]


def pass_figures(res: Results, quick: bool, rounds: int = 5) -> dict:
    """One cached count-sketch pass over SmolLM2's shapes (random gradients, no model needed),
    three ways, alternating, ``rounds`` rounds: the fold pass as it was (parameter by parameter,
    torch's intra-op threads splitting each chunk's bitwise ops), the row pass as it is
    (parameter by parameter on one intra-op thread), and the fold pass as it is
    (`GradientSketch.sketch_parallel` on torch's threads). Wall and CPU seconds, medians;
    returns the raw seconds."""
    shapes = smollm2_shapes(2, 4096) if quick else smollm2_shapes()
    gen = torch.Generator().manual_seed(0)
    grads = [(n, torch.randn(s, generator=gen)) for n, s in shapes]
    sk = build_sketch(SketchSpec(), shapes)
    sk.sketch(grads)  # fills the code cache: every way below reads it
    threads = torch.get_num_threads()

    def before() -> None:  # add_'s chunk loop, without the one-thread block around it
        row = sk.zeros()
        for name, g in grads:
            sk._add_countsketch_chunks(row, name, g.reshape(-1), False, False)

    def row_pass() -> None:
        row = sk.zeros()
        for name, g in grads:
            sk.add_(row, name, g, check=False)

    ways = {"before": before, "row": row_pass, "parallel": lambda: sk.sketch_parallel(grads)}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
    for rep in range(2 if quick else rounds):
        for key in ways if rep % 2 == 0 else reversed(ways):
            t, c = time.perf_counter(), time.process_time()
            ways[key]()
            times[key].append((time.perf_counter() - t, time.process_time() - c))
    wall = {k: [w for w, _ in v] for k, v in times.items()}
    cpu = {k: float(np.median([c for _, c in v])) for k, v in times.items()}
    n = sum(g.numel() for _, g in grads)
    sec = f"count-sketch pass, SmolLM2's shapes ({n / 1e6:.1f}M coordinates, {threads} threads)"
    for key, label in (
        ("before", "fold pass before (per parameter, intra-op threads)"),
        ("row", "row pass (per parameter, one intra-op thread)"),
        ("parallel", f"fold pass (sketch_parallel, {threads} threads)"),
    ):
        w = wall[key]
        res.add(
            sec,
            label,
            float(np.median(w)),
            "s",
            note=f"{min(w):.3f}-{max(w):.3f} s wall over {len(w)} rounds, {cpu[key]:.2f} CPU-s",
        )
    res.add(
        sec,
        "fold pass before ÷ fold pass now (wall)",
        float(np.median(wall["before"]) / np.median(wall["parallel"])),
        "×",
        note="medians; the rows of sketch_parallel differ from the sequential pass's only in "
        "rounding (8 partial rows)",
    )
    return {"threads": threads, "coordinates": n, "seconds": times}


def _plain_fwd_bwd(model, batches: list[dict]) -> float:
    """Seconds of a plain training forward+backward (model's own loss) over ``batches``, with
    freed memory kept on the CPU as the stage keeps it (`keep_freed_memory`)."""
    t0 = time.perf_counter()
    with keep_freed_memory(next(model.parameters()).device):
        for b in batches:
            model(**b).loss.backward()
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _sketch_seconds(model, tok, mix: Mixture, cal: CalibrationConfig, reps: int) -> float:
    """Seconds to count-sketch and norm one source's full gradient, as the stage does, best of
    ``reps``."""
    selected = select_parameters(model)
    sk = build_sketch(SketchSpec(), [(n, tuple(p.shape)) for n, p in selected])
    src = mix.sources[0]
    ex = tokenize_examples(tok, src.calibration[: cal.n], cal.max_length)
    model.zero_grad(set_to_none=True)
    source_gradient(model, ex, pad_token_id=tok.pad_token_id, micro_batch_size=cal.micro_batch_size)
    best = float("inf")
    for _ in range(reps):  # the stage's row pass: sketch, finiteness check and norm in one read
        t0 = time.perf_counter()
        row, sq = sk.zeros(), 0.0
        for name, p in selected:
            sq += sk.add_(row, name, p.grad, square_norm=True)
        best = min(best, time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return best


def _per_example_seconds(model, tok, mix: Mixture, n: int, cal: CalibrationConfig) -> float:
    """LESS-style: a backward and a count-sketch per example, averaged per source."""
    selected = select_parameters(model)
    sk = build_sketch(SketchSpec(), [(nm, tuple(p.shape)) for nm, p in selected])
    t0 = time.perf_counter()
    for src in mix:
        acc = sk.zeros()
        for ex in tokenize_examples(tok, src.calibration[:n], cal.max_length):
            model.zero_grad(set_to_none=True)
            source_gradient(model, [ex], pad_token_id=tok.pad_token_id, micro_batch_size=1)
            acc += sk.sketch((nm, p.grad) for nm, p in selected if p.grad is not None)
        acc /= n
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def scale_child(t: int, n: int) -> dict:
    """One point of the T sweep, run in a fresh process: stage seconds and peak RSS growth."""
    torch.manual_seed(0)
    tok, model, mix = _setup()
    mix = _replicated(mix, t)
    cal = load_config(DEMO_CONFIG).calibration
    tokens = sum(
        ex.n_tokens
        for src in mix
        for ex in tokenize_examples(tok, src.calibration[:n], cal.max_length)
    )
    # Warm-up outside the measurement (first-call allocations, thread pools).
    estimate_gradients(model, tok, mix.select(mix.names[:1]), n=8, progress=False)
    base = reset_peak_rss()
    seconds = float("inf")
    for _ in range(2):  # best of two: a single short run at small T is mostly noise
        t0 = time.perf_counter()
        bank = estimate_gradients(
            model,
            tok,
            mix,
            n=n,
            micro_batch_size=cal.micro_batch_size,
            max_length=cal.max_length,
            progress=False,
        )
        seconds = min(seconds, time.perf_counter() - t0)
        rows_bytes = int(bank.rows.nbytes)
        del bank  # so the second run's bank does not sit beside the first's
    peak = peak_rss()
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "T": t,
        "seconds": seconds,
        "tokens": tokens,
        "peak_growth_bytes": max(0, peak - base),
        "bank_bytes": rows_bytes,
        "t_x_params_bytes": 4 * n_params * t,
    }


def run(quick: bool = False) -> Results:
    res = Results("gradients")
    torch.manual_seed(0)
    cal = load_config(DEMO_CONFIG).calibration
    tok, model, mix = _setup(4 if quick else None)
    n = 16 if quick else cal.n
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"demo base: {n_params:,} parameters; {len(mix)} sources x {n} calibration examples")

    # Same micro-batches for both sides.
    batches = [
        [
            collate(ex[i : i + cal.micro_batch_size], tok.pad_token_id)
            for i in range(0, len(ex), cal.micro_batch_size)
        ]
        for ex in (tokenize_examples(tok, s.calibration[:n], cal.max_length) for s in mix)
    ]
    tokens = sum(int(b["attention_mask"].sum()) for bs in batches for b in bs)
    estimate_gradients(model, tok, mix.select(mix.names[:1]), n=8, progress=False)  # warm-up
    _plain_fwd_bwd(model, batches[0])

    # Alternate the two sides and keep each one's best, so drift on a shared machine hits both.
    t_stage, t_plain = float("inf"), float("inf")
    rounds: list[dict] = []
    for rep in range(1 if quick else 3):
        _log(f"plain fwd+bwd vs gradient stage, round {rep + 1}")
        tp = sum(_plain_fwd_bwd(model, bs) for bs in batches)
        t0 = time.perf_counter()
        estimate_gradients(
            model,
            tok,
            mix,
            n=n,
            micro_batch_size=cal.micro_batch_size,
            max_length=cal.max_length,
            progress=False,
        )
        ts_ = time.perf_counter() - t0
        rounds.append({"plain_s": tp, "stage_s": ts_})
        _log(f"  plain {tp:.2f} s, stage {ts_:.2f} s")
        t_plain, t_stage = min(t_plain, tp), min(t_stage, ts_)
    res.add(
        SECTION,
        "stage tokens/s ÷ plain fwd+bwd tokens/s",
        t_plain / t_stage,
        "×",
        target=(">=", 0.9),
        note=f"{tokens:,} tokens; plain {tokens / t_plain:,.0f} tok/s, "
        f"stage {tokens / t_stage:,.0f} tok/s",
    )

    t0 = time.perf_counter()
    for src in mix:
        tokenize_examples(tok, src.calibration[:n], cal.max_length)
    t_tok = time.perf_counter() - t0
    res.add(
        SECTION,
        "tokenising (chat template) ÷ plain fwd+bwd",
        100 * t_tok / t_plain,
        "%",
        note="part of the stage, not of the plain pass: the main part of the gap above on "
        "this 653k-parameter model; it does not grow with the model, so it shrinks "
        "as a share on a bigger one",
    )
    t_sketch = _sketch_seconds(model, tok, mix, dataclasses.replace(cal, n=n), 3)
    share = 100 * t_sketch / (t_stage / len(mix))
    res.add(
        SECTION,
        f"count-sketch (d=2^{DEFAULT_SKETCH_DIM.bit_length() - 1}) share of the stage per source",
        share,
        "%",
        target=("<=", 10.0),
    )
    passes = pass_figures(res, quick)
    _log("gradient stage with and without fold sketches")
    folds = stage_rounds(model, tok, mix, cal, n, 2 if quick else 3)
    add_fold_figures(res, SECTION, folds, cal.folds, f"; {len(mix)} sources x {n} examples")

    # Per-example (LESS) vs batched, on a few sources.
    sub = mix.select(mix.names[: 2 if quick else 4])
    n_pe = 8 if quick else 50
    _log(f"per-example (LESS way) vs batched: {len(sub)} sources x {n_pe} examples")
    t_pe = _per_example_seconds(model, tok, sub, n_pe, cal)
    t0 = time.perf_counter()
    estimate_gradients(
        model,
        tok,
        sub,
        n=n_pe,
        micro_batch_size=cal.micro_batch_size,
        max_length=cal.max_length,
        progress=False,
    )
    t_b = time.perf_counter() - t0
    res.add(
        SECTION,
        "per-example (LESS way) time ÷ batched",
        t_pe / t_b,
        "×",
        note="one backward + one sketch per example; reference only",
    )

    # T sweep, each in a fresh process.
    ts = (4, 8) if quick else (8, 16, 32, 64, 128)
    n_t = 8 if quick else 50
    sweep = []
    for t in ts:
        _log(f"scaling: T = {t} sources x {n_t} examples (fresh process)")
        out, _, _ = in_child(scale_child, t, n_t)
        sweep.append(out)
    secs = [p["seconds"] for p in sweep]
    toks = [p["tokens"] for p in sweep]
    per_source = ", ".join(f"T={t} {s / t:.3f} s" for t, s in zip(ts, secs, strict=True))
    res.add(
        SECTION,
        f"seconds per token, spread over T = {ts[0]}…{ts[-1]}",
        100 * rel_slope_spread(toks, secs),
        "%",
        target=("<=", 15.0),
        note="(max − min)/mean of seconds per calibration token; 0% is exactly linear "
        f"in the work. Per source: {per_source}",
    )
    g0, g1 = sweep[0], sweep[-1]
    extra = (g1["peak_growth_bytes"] - g0["peak_growth_bytes"]) / max(
        1, g1["bank_bytes"] - g0["bank_bytes"]
    )
    res.add(
        SECTION,
        f"peak-RSS growth T={ts[0]}→{ts[-1]} ÷ bank growth",
        extra,
        "×",
        target=("<=", 1.5),
        note=f"peak grew {(g1['peak_growth_bytes'] - g0['peak_growth_bytes']) / 2**20:.0f} "
        f"MiB; bank {g0['bank_bytes'] / 2**20:.1f}→{g1['bank_bytes'] / 2**20:.1f} MiB; "
        f"T×params would be {g1['t_x_params_bytes'] / 2**20:.0f} MiB; the bank (T × 4 × "
        "dim bytes) is the only thing that should grow",
    )
    res.raw = {
        "parameters": n_params,
        "sources": len(mix),
        "n": n,
        "tokens": tokens,
        "stage_s": t_stage,
        "plain_fwd_bwd_s": t_plain,
        "rounds": rounds,
        "sketch_s_per_source": t_sketch,
        "folds": folds,
        "passes": passes,
        "tokenize_s": t_tok,
        "per_example_s": t_pe,
        "batched_s": t_b,
        "scaling": sweep,
        "per_source_s": list(np.asarray(secs) / np.asarray(ts)),
    }
    return res


if __name__ == "__main__":
    bench_main(run, __doc__)
