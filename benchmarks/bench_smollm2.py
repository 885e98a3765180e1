"""The gradient stage on a real pretrained model: SmolLM2-135M-Instruct against its plain fwd+bwd.

Measured with the calibration settings of ``configs/smollm2.yaml`` (16 dialogues per source, micro-
batches of 8, max length 256) on its 8 chatterbot sources (``merit-lab fetch-data chatterbot``),
every parameter (134.5M) count-sketched to 2^18:

* **plain fwd+bwd tokens/s**: a training forward+backward (the model's own loss) over the
  stage's own micro-batches without folds (by length, at the CPU's price of a batch,
  `batching.CPU_CALL_TOKENS`), pre-collated: the floor the stage cannot beat;
* **stage tokens/s** and their ratio (target ≥ 0.9×, as on the demo base), the stage without
  folds over the same batches (the folds' cost is the next figure's);
* **fold sketches** (4 folds, the default): their share of the stage and the stage with folds
  over the stage without (target ≤ 5%, `benchmarks.bench_gradients.stage_rounds`), and the share
  at the paper's n = 200, scaled from the measured seconds (the fold passes do not grow with n,
  the forward and backward do), and both figures measured at the largest n the data holds (the
  two sources with the most calibration examples, 96 each on chatterbot);
* **batches priced ÷ fewest batches**: at that n without folds, the stage with its micro-
  batches formed at the CPU's price of a batch (`batching.CPU_CALL_TOKENS`) over the stage with
  the fewest (what it runs on a GPU).

Rounds alternate the two sides; the figures are the medians, the notes give the spread. Skipped
(and saying why) where the model or the data are not fetched.

Run: python -m benchmarks.bench_smollm2 [--quick] [--out bench-smollm2.json]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_gradients import _log, _plain_fwd_bwd, add_fold_figures, stage_rounds
from benchmarks.common import Results, bench_main
from merit_lab.config.schema import load_config
from merit_lab.data.formatting import collate, tokenize_examples
from merit_lab.data.mixture import load_mixture
from merit_lab.gradients import estimate
from merit_lab.gradients.batching import CPU_CALL_TOKENS, micro_batches, padded_calls
from merit_lab.gradients.estimate import estimate_gradients
from merit_lab.models.fetch import RECORD, fetched_model_path
from merit_lab.models.loading import load_model, load_tokenizer

SECTION = "gradient bank, SmolLM2-135M"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2.yaml"


def run(quick: bool = False) -> Results:
    res = Results("smollm2")
    cfg = load_config(CONFIG)
    data = Path(cfg.mixture.path)
    if not (fetched_model_path("smollm2") / RECORD).is_file() or not data.is_dir():
        res.skip(
            SECTION,
            "stage ÷ plain fwd+bwd",
            "run `merit-lab fetch-model smollm2` and `merit-lab fetch-data chatterbot` first",
        )
        return res
    cal = cfg.calibration
    torch.manual_seed(0)
    tok, model = load_tokenizer("smollm2"), load_model("smollm2", device="cpu")
    mix = load_mixture(data, calibration_n=cal.n, eval_fraction=cfg.mixture.eval_fraction)
    if quick:
        mix = mix.select(mix.names[:2])
    n = 4 if quick else cal.n
    batches = [  # the stage's own micro-batches without folds
        collate(b, tok.pad_token_id)
        for ex in (tokenize_examples(tok, s.calibration[:n], cal.max_length) for s in mix)
        for b in micro_batches(ex, size=cal.micro_batch_size, call_tokens=CPU_CALL_TOKENS)
    ]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    _plain_fwd_bwd(model, batches[:1])  # warm-up
    plain, stage = [], []
    for rep in range(1 if quick else 3):
        plain.append(_plain_fwd_bwd(model, batches))
        t0 = time.perf_counter()
        estimate_gradients(
            model,
            tok,
            mix,
            n=n,
            micro_batch_size=cal.micro_batch_size,
            max_length=cal.max_length,
            folds=1,  # the same batches as the plain pass; the folds' cost is measured below
            progress=False,
        )
        stage.append(time.perf_counter() - t0)
        print(
            f"[smollm2] round {rep + 1}: plain {plain[-1]:.1f} s, stage {stage[-1]:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    spread = f"{len(mix)} sources x {n} examples, {tokens:,} tokens; {len(plain)} rounds"
    res.add(
        SECTION,
        "plain fwd+bwd",
        tokens / float(np.median(plain)),
        "tok/s",
        note=f"{spread}, {min(plain):.1f}-{max(plain):.1f} s",
    )
    res.add(
        SECTION,
        "gradient stage",
        tokens / float(np.median(stage)),
        "tok/s",
        note=f"{min(stage):.1f}-{max(stage):.1f} s (tokenising, response loss, sketch)",
    )
    res.add(
        SECTION,
        "stage ÷ plain fwd+bwd",
        float(np.median(plain) / np.median(stage)),
        "×",
        target=(">=", 0.9),
    )
    r = stage_rounds(model, tok, mix, cal, n, 2 if quick else 3)
    add_fold_figures(res, SECTION, r, cal.folds, f"; {len(mix)} sources x {n} examples")
    fold_s, rest_s = float(np.median(r["fold_s"])), float(np.median(r["without_s"]))
    res.add(
        SECTION,
        "fold sketches ÷ gradient stage at n = 200 (scaled)",
        100 * fold_s / (fold_s + rest_s * 200 / n),
        "%",
        note=f"the measured {fold_s:.1f} s of fold sketches over the stage without folds "
        f"({rest_s:.1f} s at n = {n}) times 200/{n}",
    )
    # Measured at the largest n the data holds: the two sources with the most calibration
    # examples, all of them (96 on chatterbot), so the scaled row above is checked by a run.
    every = load_mixture(data, calibration_n=200, eval_fraction=cfg.mixture.eval_fraction)
    big = sorted(every.names, key=lambda s: -len(every[s].calibration))[:2]
    n_big = 8 if quick else min(len(every[s].calibration) for s in big)
    # and with whole micro-batches dealt to the folds (calibration.fold_deal: batches): 12
    # batches of 8 a source, 3 a fold
    deals = ("examples", "batches")
    rb = stage_rounds(model, tok, every.select(big), cal, n_big, 1 if quick else 2, deals)
    for deal in deals:
        note = f"; {len(big)} sources x {n_big} examples"
        add_fold_figures(res, SECTION, rb, cal.folds, note, n_big, deal)
    res.raw["folds_large_n"] = rb | {"sources": big, "n": n_big}
    res.raw["folds"] = r
    # what pricing a batch saves there, without folds: the stage's batches on the CPU against
    # the fewest (what a GPU runs)
    price = price_rounds(model, tok, every.select(big), cal, n_big, 1 if quick else 2)
    ratio = [p / f for p, f in zip(price["priced_s"], price["fewest_s"], strict=True)]
    res.add(
        SECTION,
        f"stage, batches priced ÷ fewest batches at n = {n_big}",
        float(np.median(ratio)),
        "×",
        note=f"{min(ratio):.3f}-{max(ratio):.3f} over {len(ratio)} rounds; without folds; a batch "
        f"at {CPU_CALL_TOKENS} padded tokens; {price['priced_batches']} batches against "
        f"{price['fewest_batches']}, {price['priced_padded']:,} padded tokens against "
        f"{price['fewest_padded']:,}",
    )
    res.raw["price"] = price
    return res


def price_rounds(model, tok, mix, cal, n: int, rounds: int) -> dict:
    """Alternating rounds of the stage without folds, its micro-batches formed at the CPU's price
    of a batch (`batching.CPU_CALL_TOKENS`, what the stage does on the CPU) and as the fewest
    (the price None, what it does on a GPU); wall seconds of each and their batches' counts."""
    out: dict = {"priced_s": [], "fewest_s": []}
    kw = dict(n=n, micro_batch_size=cal.micro_batch_size, max_length=cal.max_length)
    for name, price in (("priced", CPU_CALL_TOKENS), ("fewest", None)):
        batches = [
            b
            for s in mix
            for b in micro_batches(
                tokenize_examples(tok, s.calibration[:n], cal.max_length),
                size=cal.micro_batch_size,
                call_tokens=price,
            )
        ]
        out[f"{name}_batches"], out[f"{name}_padded"] = padded_calls(batches)
    sides = [("priced", CPU_CALL_TOKENS), ("fewest", None)]
    for rep in range(rounds):
        for name, price in sides if rep % 2 == 0 else sides[::-1]:
            estimate.CPU_CALL_TOKENS = price  # the stage's price on this CPU, for this round
            try:
                t0 = time.perf_counter()
                estimate_gradients(model, tok, mix, folds=1, progress=False, **kw)
                out[f"{name}_s"].append(time.perf_counter() - t0)
            finally:
                estimate.CPU_CALL_TOKENS = CPU_CALL_TOKENS
        _log(
            f"  price round {rep + 1}: priced {out['priced_s'][-1]:.1f} s, fewest "
            f"{out['fewest_s'][-1]:.1f} s"
        )
    return out


if __name__ == "__main__":
    bench_main(run, __doc__)
