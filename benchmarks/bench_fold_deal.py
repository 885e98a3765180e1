"""What dealing whole micro-batches to the folds does to the fold stability, on real gradients.

``calibration.fold_deal: batches`` (`merit_lab.gradients.batching.fold_batches`) saves the
padding that folds cost (a micro-batch cannot span two folds), but a fold is then made of whole
batches of length neighbours. Where a source's gradient changes with its examples' length, two
halves then differ more than two draws of single examples would: the stability reads
conservative. This measures by how much.

Per-example sketched gradients of each source's calibration examples
(`merit_lab.analysis.convergence.sketch_example_gradients`, count-sketch 2^14) are taken once;
then, over R random orders of each calibration draw, the folds are formed both ways from the
same order (examples i mod 4; whole batches of 8 by length, `fold_batches`), each fold row the
token-weighted mean of its examples (the gradient stage's fold row, exactly: the sketch is
linear), and `compute_fold_stability` reads both. Figures: the ratio of the median cosine
standard error (batches ÷ examples, median over orders), the halves' matrix correlation and
r = 2 ARI under each deal (means over orders), and what each deal saves: the padded tokens of
the stage's micro-batches with 4 folds ÷ without folds (medians over the same orders).

Data: the demo base on the 32 demo sources (n = 200) and, when fetched, SmolLM2-135M-Instruct on
the 4 chatterbot sources with the most calibration dialogues (n = 96 each). CPU, one round (the
figures are statistics, not timings): about 1 min for the demo, 8 min for SmolLM2 on 2 cores.

Run: python -m benchmarks.bench_fold_deal [--quick] [--out bench-fold-deal.json]
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Results, bench_main
from merit_lab.analysis.convergence import sketch_example_gradients
from merit_lab.config.schema import load_config
from merit_lab.data.formatting import tokenize_examples
from merit_lab.data.mixture import Mixture, load_mixture
from merit_lab.gradients.batching import CPU_CALL_TOKENS, deal_folds, fold_batches, padded_calls
from merit_lab.gradients.sketch import SketchSpec
from merit_lab.models.fetch import RECORD, fetched_model_path
from merit_lab.models.loading import load_model, load_tokenizer
from merit_lab.partition.folds import compute_fold_stability

SECTION = "fold deal: whole batches against examples"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2.yaml"
FOLDS, BATCH, DIM = 4, 8, 2**14
_Ex = dataclasses.make_dataclass("_Ex", ["i", "n_tokens"])


def _log(msg: str) -> None:
    print(f"[fold-deal] {msg}", file=sys.stderr, flush=True)


def example_gradients(model, tok, mix: Mixture, n: int, max_length: int) -> dict[str, np.ndarray]:
    """Per source: (n, d) sketched example gradients, (n,) response tokens, (n,) lengths."""
    g, w, lengths = [], [], []
    t0 = time.perf_counter()
    for s in mix:
        examples = list(s.calibration[:n])
        rows, tokens = sketch_example_gradients(
            model, tok, examples, sketch=SketchSpec(dim=DIM), max_length=max_length
        )
        g.append(rows)
        w.append(tokens.astype(np.float64))
        lengths.append([e.n_tokens for e in tokenize_examples(tok, examples, max_length)])
        _log(f"  {s.name}: {len(examples)} example gradients, {time.perf_counter() - t0:.0f} s")
    return {"g": np.stack(g), "w": np.stack(w), "lengths": np.asarray(lengths)}


def fold_rows(grads: dict, orders: list[np.ndarray], deal: str) -> tuple[np.ndarray, np.ndarray]:
    """(T, m, d) fold rows and (T, m) tokens with the calibration draws in ``orders``."""
    g, w, lengths = grads["g"], grads["w"], grads["lengths"]
    t = g.shape[0]
    rows, toks = np.empty((t, FOLDS, g.shape[2])), np.empty((t, FOLDS))
    for s in range(t):
        exs = [_Ex(int(i), int(lengths[s, i])) for i in orders[s]]  # calibration order
        if deal == "examples":
            folds = [[f] for f in deal_folds(exs, FOLDS)]
        else:
            folds = fold_batches(exs, FOLDS, size=BATCH, deal="batches")
            if len(folds[0]) < 2:
                raise ValueError(f"{len(exs)} examples make fewer than 2 batches of {BATCH} a fold")
        for f, fold in enumerate(folds):
            idx = [e.i for b in fold for e in b]
            toks[s, f] = w[s, idx].sum()
            rows[s, f] = (g[s, idx] * w[s, idx, None]).sum(axis=0) / toks[s, f]
    return rows.astype(np.float32), toks


def compare(grads: dict, names: list[str], orders: int, seed: int = 0) -> dict[str, list]:
    """Per deal, per random order: [median cosine SE, halves' Pearson, halves' r = 2 ARI]."""
    rng = np.random.default_rng(seed)
    t, n = grads["g"].shape[:2]
    iu = np.triu_indices(t, k=1)
    counts = {s: 100 for s in names}, {s: 1000 for s in names}
    out: dict[str, list] = {"examples": [], "batches": []}
    for _ in range(orders):
        order = [rng.permutation(n) for _ in range(t)]
        for deal in out:
            rows, toks = fold_rows(grads, order, deal)
            st = compute_fold_stability(
                rows,
                toks,
                names,
                n_examples=[n] * t,
                examples=counts[0],
                train_tokens=counts[1],
                rs=(2,),
                sims=1,
            )
            out[deal].append(
                [
                    float(np.median(st.cosine_se[iu])),
                    st.pearson_halves.mean(),
                    st.ari_halves[2].mean(),
                ]
            )
    return out


def padding(lengths: np.ndarray, orders: int, seed: int = 0) -> dict[str, list[int]]:
    """Padded tokens of all sources' micro-batches (at most 8 a batch) per random calibration
    order: without folds, with 4 folds dealt by example, and by whole batch, each as the fewest
    batches (a GPU's stage); and without folds and by example with batches priced as the CPU's
    stage prices them (``*_cpu``, `batching.CPU_CALL_TOKENS`), with their batch counts
    (``calls_*``)."""
    rng = np.random.default_rng(seed)
    keys = ("none", "examples", "batches", "none_cpu", "examples_cpu")
    out: dict[str, list[int]] = {k: [] for k in (*keys, "calls_none_cpu", "calls_examples_cpu")}

    def padded(folds: list) -> int:
        return padded_calls([b for fold in folds for b in fold])[1]

    for _ in range(orders):
        total = dict.fromkeys(out, 0)
        for row in lengths:
            exs = [_Ex(int(i), int(row[i])) for i in rng.permutation(len(row))]
            total["none"] += padded(fold_batches(exs, 1, size=BATCH))
            for deal in ("examples", "batches"):
                total[deal] += padded(fold_batches(exs, FOLDS, size=BATCH, deal=deal))
            for k, m in (("none_cpu", 1), ("examples_cpu", FOLDS)):
                folds = fold_batches(exs, m, size=BATCH, call_tokens=CPU_CALL_TOKENS)
                total[k] += padded(folds)
                total[f"calls_{k}"] += sum(map(len, folds))
        for k in out:
            out[k].append(total[k])
    return out


def add_padding(res: Results, label: str, pad: dict[str, list[int]], real: int) -> None:
    sides = (("examples", "none", "by example"), ("batches", "none", "by batch"))
    for key, base, by in (*sides, ("examples_cpu", "none_cpu", "by example, batches priced")):
        none = np.asarray(pad[base], dtype=float)
        ratio = np.asarray(pad[key]) / none
        calls = ""
        if key.endswith("_cpu"):  # the price buys padding with batches: say how many
            calls = (
                f"; {np.median(pad['calls_' + key]):,.0f} batches against "
                f"{np.median(pad['calls_' + base]):,.0f} (a batch at {CPU_CALL_TOKENS} tokens)"
            )
        res.add(
            SECTION,
            f"padded tokens with folds ÷ without, {by} ({label})",
            float(np.median(ratio)),
            "×",
            note=f"5-95%: {np.percentile(ratio, 5):.3f}-{np.percentile(ratio, 95):.3f}; median "
            f"{np.median(pad[key]):,.0f} against {np.median(none):,.0f} without folds "
            f"({real:,} real tokens){calls}",
        )


def add_figures(res: Results, label: str, out: dict[str, list]) -> None:
    e, b = np.asarray(out["examples"]), np.asarray(out["batches"])
    ratio = b[:, 0] / e[:, 0]
    lo, hi = np.percentile(ratio, [5, 95])
    res.add(
        SECTION,
        f"cosine standard error, batches ÷ examples ({label})",
        float(np.median(ratio)),
        "×",
        note=f"5-95%: {lo:.2f}-{hi:.2f} over {len(ratio)} orders; median SE "
        f"{np.median(e[:, 0]):.4f} by example",
    )
    for k, what in ((1, "halves' matrix correlation"), (2, "halves' r = 2 ARI")):
        for deal, v in (("example", e), ("batch", b)):
            res.add(
                SECTION,
                f"{what}, by {deal} ({label})",
                float(v[:, k].mean()),
                note=f"± {v[:, k].std(ddof=1) / np.sqrt(len(v)):.3f}, mean over {len(v)} orders",
            )


def measure(res: Results, label: str, grads: dict, names: list[str], orders: int) -> dict:
    """Every figure of one model's example gradients; returns their raw values."""
    out = compare(grads, names, orders)
    add_figures(res, label, out)
    pad = padding(grads["lengths"], orders)
    add_padding(res, label, pad, int(grads["lengths"].sum()))
    return out | {"padded": pad}


def run(quick: bool = False) -> Results:
    res = Results("fold_deal")
    orders = 8 if quick else 100
    demo = load_mixture("demo")
    mix = demo.select(demo.names[:4]) if quick else demo
    n = 2 * FOLDS * BATCH if quick else 200
    grads = example_gradients(load_model("demo"), load_tokenizer("demo"), mix, n, 256)
    label = f"demo, {len(mix)} sources × {n}"
    res.raw["demo"] = measure(res, label, grads, list(mix.names), orders)

    cfg = load_config(CONFIG)
    data = Path(cfg.mixture.path)
    if quick or not (fetched_model_path("smollm2") / RECORD).is_file() or not data.is_dir():
        why = (
            "--quick"
            if quick
            else "run `merit-lab fetch-model smollm2` and `fetch-data chatterbot`"
        )
        res.skip(SECTION, "SmolLM2 on chatterbot", why)
        return res
    every = load_mixture(data, calibration_n=200, eval_fraction=cfg.mixture.eval_fraction)
    big = sorted(every.names, key=lambda s: -len(every[s].calibration))[:4]
    n = min(len(every[s].calibration) for s in big)
    model, tok = load_model("smollm2", device="cpu"), load_tokenizer("smollm2")
    grads = example_gradients(model, tok, every.select(big), n, cfg.calibration.max_length)
    label = f"SmolLM2, {len(big)} chatterbot sources × {n}"
    res.raw["smollm2"] = measure(res, label, grads, big, orders) | {"sources": big, "n": n}
    return res


if __name__ == "__main__":
    bench_main(run, __doc__)
