"""What a forward/backward costs on the CPU beyond its padded tokens, and what the gradient
stage's price of a micro-batch (`merit_lab.gradients.batching.CPU_CALL_TOKENS`) buys.

The stage forms its CPU micro-batches as the fewest padded positions plus a price per batch
(`batching._runs`). The price stands for a call's fixed work: every op dispatched once, a fresh
gradient of every parameter written and added into ``.grad``. This benchmark measures it:

* **a call's fixed work, in padded tokens**, per model: a least-squares fit of seconds = fixed +
  per padded token over forward/backward calls of random tokens (batches of 1, 2, 4, 8 × 8, 32,
  96 tokens; the median of 3 calls a shape in each round, gradients accumulating as in the
  stage, freed memory kept as in the stage), on the demo base, a Llama shape of 11M parameters
  built from a config, and SmolLM2-135M-Instruct where it is fetched;
* **the stage's predicted seconds at each price**, without folds and with 4: the fit applied to
  the batches (`batching.fold_batches`) the stage forms from the real tokenised calibration
  examples of the demo (8 sources × 200) and of SmolLM2 (4 chatterbot sources × 16), so the
  predictions have no timing noise beyond the fit's. Figures: the library's price against the
  best on the grid (target: within 2%), and the folds' predicted cost at the library's price
  (their batching only: the fold sketch passes are `bench_gradients`' and `bench_smollm2`'s).

Run: python -m benchmarks.bench_call_price [--quick] [--out bench-call-price.json]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_fold_deal import _Ex
from benchmarks.common import Results, bench_main
from merit_lab.gradients.batching import CPU_CALL_TOKENS, fold_batches, padded_calls

SECTION = "CPU price of a micro-batch"
PRICES = (None, 20, 50, 100, 200, 400)  # None: the fewest batches (a GPU's stage)
FOLDS = 4


def _log(msg: str) -> None:
    print(f"[call-price] {msg}", file=sys.stderr, flush=True)


def fit_call(model, shapes, rounds: int, calls: int = 3, seed: int = 0) -> dict:
    """Seconds = fixed + per_token · padded tokens, least squares over ``rounds`` × ``shapes``
    (batch, length) of random-token forward/backward calls accumulating into ``.grad`` (the
    median of ``calls`` after one untimed call a shape), freed memory kept."""
    from merit_lab.models.cpu_memory import keep_freed_memory

    gen = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    rows = []
    model.zero_grad(set_to_none=True)
    with keep_freed_memory(torch.device("cpu")):
        for _ in range(rounds):
            for b, n in shapes:
                ids = torch.randint(0, vocab, (b, n), generator=gen)
                batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
                model(**batch).loss.backward()
                ts = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    model(**batch).loss.backward()
                    ts.append(time.perf_counter() - t0)
                rows.append((b * n, float(np.median(ts))))
    model.zero_grad(set_to_none=True)
    a = np.array([[1.0, t] for t, _ in rows])
    y = np.array([s for _, s in rows])
    (fixed, per_token), *_ = np.linalg.lstsq(a, y, rcond=None)
    resid = y - a @ np.array([fixed, per_token])
    return {
        "fixed_s": float(fixed),
        "per_token_s": float(per_token),
        "tokens_a_call": float(fixed / per_token),
        "resid_sd_s": float(resid.std()),
        "calls": len(rows),
        "params": sum(p.numel() for p in model.parameters()),
    }


def predict(lengths: list[list[int]], size: int, fit: dict, folds: int, price) -> dict:
    """The stage's batches of sources with these tokenised ``lengths`` at ``price`` (None: the
    fewest), and their predicted seconds under ``fit``."""
    calls = padded = 0
    for row in lengths:
        exs = [_Ex(i, n) for i, n in enumerate(row)]
        for fold in fold_batches(exs, folds, size=size, call_tokens=price):
            c, p = padded_calls(fold)
            calls, padded = calls + c, padded + p
    return {
        "calls": calls,
        "padded": padded,
        "seconds": calls * fit["fixed_s"] + padded * fit["per_token_s"],
    }


def _llama(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _lengths(cfg, tok, sources: int, n: int) -> list[list[int]]:
    from merit_lab.data.formatting import tokenize_examples
    from merit_lab.data.mixture import load_mixture

    path = cfg.mixture.path
    path = Path(path) if Path(path).is_dir() else path
    mix = load_mixture(path, calibration_n=n, eval_fraction=cfg.mixture.eval_fraction)
    return [
        [e.n_tokens for e in tokenize_examples(tok, s.calibration[:n], cfg.calibration.max_length)]
        for s in list(mix)[:sources]
    ]


def _price(p) -> str:
    return "fewest" if p is None else str(p)


def add_predictions(res: Results, label: str, lengths, size: int, fit: dict) -> dict:
    grid = {
        (_price(p), folds): predict(lengths, size, fit, folds, p)
        for p in dict.fromkeys(
            (*PRICES, CPU_CALL_TOKENS)
        )  # the library's price, on the grid or not
        for folds in (1, FOLDS)
    }
    ours = _price(CPU_CALL_TOKENS)
    for folds, what in ((1, "without folds"), (FOLDS, f"with {FOLDS} folds")):
        best = min((k for k in grid if k[1] == folds), key=lambda k: grid[k]["seconds"])
        here = grid[(ours, folds)]
        res.add(
            SECTION,
            f"{label}: predicted stage at {CPU_CALL_TOKENS} tokens ÷ the best price, {what}",
            here["seconds"] / grid[best]["seconds"],
            "×",
            target=("<=", 1.02),
            note=f"best {best[0]}; {here['calls']} batches, {here['padded']:,} padded tokens, "
            f"{here['seconds']:.1f} s; at 20: {grid[('20', folds)]['seconds']:.1f} s",
        )
    cost = grid[(ours, FOLDS)]["seconds"] / grid[(ours, 1)]["seconds"] - 1
    res.add(
        SECTION,
        f"{label}: folds' predicted batching cost at {CPU_CALL_TOKENS} tokens",
        100 * cost,
        "%",
        note="; ".join(
            f"{p}: {100 * (grid[(p, FOLDS)]['seconds'] / grid[(p, 1)]['seconds'] - 1):+.1f}%"
            for p in dict.fromkeys(k[0] for k in grid)
        ),
    )
    return {f"{p}|{f}": v for (p, f), v in grid.items()}


def _add_fit(res: Results, name: str, fit: dict) -> None:
    res.add(
        SECTION,
        f"{name}: a call's fixed work",
        fit["tokens_a_call"],
        "tokens",
        note=f"{fit['params'] / 1e6:.2f}M parameters; {1e3 * fit['fixed_s']:.1f} ms + "
        f"{1e6 * fit['per_token_s']:.1f} µs a padded token over {fit['calls']} calls "
        f"(residual sd {1e3 * fit['resid_sd_s']:.1f} ms)",
    )


def run(quick: bool = False) -> Results:
    from merit_lab.config.schema import load_config
    from merit_lab.models.fetch import RECORD, fetched_model_path
    from merit_lab.models.loading import load_model, load_tokenizer

    res = Results("call_price")
    configs = Path(__file__).resolve().parents[1] / "configs"
    shapes = [(b, n) for b in ((1, 4) if quick else (1, 2, 4, 8)) for n in (8, 32, 96)]
    rounds = 1 if quick else 2

    demo = load_config(configs / "demo.yaml")
    model = load_model(demo.model, device="cpu")
    fit = fit_call(model, shapes, rounds)
    _log(f"demo base: {fit['tokens_a_call']:.0f} tokens a call")
    _add_fit(res, "demo base", fit)
    lengths = _lengths(demo, load_tokenizer(demo.model), 2 if quick else 32, 16 if quick else 200)
    res.raw["demo"] = {
        "fit": fit,
        "grid": add_predictions(
            res, f"demo, {len(lengths)} sources", lengths, demo.calibration.micro_batch_size, fit
        ),
    }
    if not quick:
        fit = fit_call(_llama(256, 4), shapes, rounds)
        _log(f"Llama 256 × 4: {fit['tokens_a_call']:.0f} tokens a call")
        _add_fit(res, "Llama, hidden 256, 4 layers", fit)
        res.raw["llama_256_4"] = {"fit": fit}

    cfg = load_config(configs / "smollm2.yaml")
    if quick or not (fetched_model_path("smollm2") / RECORD).is_file():
        why = "--quick" if quick else "run `merit-lab fetch-model smollm2` first"
        res.skip(SECTION, "SmolLM2-135M", why)
        return res
    model = load_model("smollm2", device="cpu")
    fit = fit_call(model, shapes, rounds)
    _log(f"SmolLM2: {fit['tokens_a_call']:.0f} tokens a call")
    _add_fit(res, "SmolLM2-135M", fit)
    raw = {"fit": fit}
    if Path(cfg.mixture.path).is_dir():
        lengths = _lengths(cfg, load_tokenizer("smollm2"), 4, cfg.calibration.n)
        label = f"SmolLM2, {len(lengths)} sources × {cfg.calibration.n}"
        raw["grid"] = add_predictions(res, label, lengths, cfg.calibration.micro_batch_size, fit)
    else:
        res.skip(SECTION, "SmolLM2 stage predictions", "run `merit-lab fetch-data chatterbot`")
    res.raw["smollm2"] = raw
    return res


if __name__ == "__main__":
    bench_main(run, __doc__)
