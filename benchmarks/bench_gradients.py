"""Gradient-bank cost and sketch fidelity on the demo, printed as a table and written as JSON.

Measures, in one process on the same model and batches:
  * per-source time of `estimate_gradients` (default count-sketch) against a plain training
    forward+backward over the same micro-batches (the physical floor of the stage);
  * the sketch's own share of that time;
  * Pearson and max |error| of the sketched cosines against exact ones, and bytes per source.

Run: .venv/bin/python benchmarks/bench_gradients.py [--sources 32] [--out bench-gradients.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from merit_lab.formatting import collate, tokenize_examples
from merit_lab.gradients import estimate_gradients
from merit_lab.mixture import load_mixture
from merit_lab.models import load_model, load_tokenizer, select_parameters
from merit_lab.sketch import SketchSpec, build_sketch, bytes_per_source, sketch_fidelity


def plain_fwd_bwd(model, examples, pad_id: int, micro: int) -> float:
    """Seconds of a plain HF training forward+backward (model's own loss) over the batches."""
    t0 = time.perf_counter()
    for i in range(0, len(examples), micro):
        b = collate(examples[i : i + micro], pad_id)
        model(**b).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=int, default=32)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--micro", type=int, default=50)
    ap.add_argument("--out", default="bench-gradients.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok, model = load_tokenizer("demo"), load_model("demo", device="cpu")
    mix = load_mixture("demo")
    mix = mix.select(mix.names[: args.sources])
    pad = tok.pad_token_id

    # Warm-up so neither side pays first-call costs.
    estimate_gradients(model, tok, mix.select(mix.names[:1]), n=16, progress=False)
    t0 = time.perf_counter()
    sk_bank = estimate_gradients(model, tok, mix, n=args.n, micro_batch_size=args.micro,
                                 progress=False)  # fmt: skip
    t_bank = time.perf_counter() - t0
    t_plain = 0.0
    for s in mix:
        t_plain += plain_fwd_bwd(model, tokenize_examples(tok, s.calibration[: args.n]), pad,
                                 args.micro)  # fmt: skip
    exact = estimate_gradients(model, tok, mix, sketch=SketchSpec(kind="exact"), n=args.n,
                               micro_batch_size=args.micro, progress=False)  # fmt: skip

    # The sketch alone: apply it to the exact gradients, parameter by parameter.
    params = [(n, tuple(p.shape)) for n, p in select_parameters(model)]
    n_params = sum(int(np.prod(s)) for _, s in params)
    rows = {}
    for spec in (SketchSpec(), SketchSpec(dim=2**16), SketchSpec(kind="subsample")):
        sk = build_sketch(spec, params)
        t0 = time.perf_counter()
        out = [sk.sketch_flat(torch.from_numpy(row)).numpy() for row in exact.rows]
        t_sk = time.perf_counter() - t0
        fid = sketch_fidelity(exact.rows, np.stack(out))
        label = f"{spec.kind}" + (f" d=2^{int(np.log2(spec.dim))}" if spec.kind != "subsample"
                                  else f" 1/{spec.every}")  # fmt: skip
        rows[label] = {**fid, "bytes_per_source": bytes_per_source(spec, n_params),
                       "sketch_s_per_source": t_sk / len(mix)}  # fmt: skip
    default_fid = sketch_fidelity(exact.rows, sk_bank.rows)

    result = {
        "sources": len(mix), "n": args.n, "parameters": n_params,
        "gradient_stage_s_per_source": t_bank / len(mix),
        "plain_fwd_bwd_s_per_source": t_plain / len(mix),
        "ratio_stage_over_plain": t_bank / t_plain,
        "default_sketch_in_stage": default_fid,
        "sketches": rows,
    }  # fmt: skip
    print(f"demo base: {n_params:,} parameters, {len(mix)} sources x {args.n} calibration examples")
    print(f"{'measure':<44}{'value':>12}  target")
    print(f"{'gradient stage / plain fwd+bwd (time ratio)':<44}{t_bank / t_plain:>12.2f}  <= 1.11")
    print(f"{'default sketch Pearson (in the stage)':<44}{default_fid['pearson']:>12.5f}  >= 0.99")
    print(f"{'default sketch max |cos error|':<44}{default_fid['max_abs_error']:>12.4f}  <= 0.005")
    print(f"\n{'sketch':<22}{'Pearson':>10}{'max|err|':>10}{'bytes/src':>12}{'share':>8}")
    for label, r in rows.items():
        share = r["sketch_s_per_source"] / (t_plain / len(mix))
        print(f"{label:<22}{r['pearson']:>10.5f}{r['max_abs_error']:>10.4f}"
              f"{r['bytes_per_source']:>12,}{share:>8.1%}")  # fmt: skip
    print("(share = sketching time / plain fwd+bwd time, per source)")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
