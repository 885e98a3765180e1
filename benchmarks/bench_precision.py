"""Half-precision gradient banks: how far bf16 / fp16 models move the conflict matrix.

A bank computed on a bfloat16 (or float16) model is compared with the exact float32 gradients
of the same model (``SketchSpec(kind="exact")``, float32 weights): Pearson and max / mean
absolute error of the cosine matrix over all source pairs, for

* **fp32, count-sketch**: the sketch's own error (the floor for the rows below);
* **bf16** (the gradient stage on a bfloat16 model: the micro-batch gradients summed in bf16 in
  ``.grad``, sketched once into the float32 row);
* **bf16, micro-batches summed in fp32** (each micro-batch's gradient sketched and summed in the
  float32 row: the alternative, twice the GPU time in ``bench_gpu``), to show what it would buy;
* **fp16** (the stage on a float16 model; demo only: float16 on the CPU is slow).

Models: the demo base (653k parameters, 16 sources of the demo mixture, n = 200) and, when
fetched, SmolLM2-135M-Instruct on 4 of its chatterbot sources (n = 32, micro-batches of 8,
every parameter: the exact rows take 0.5 GB each). CPU only,
deterministic (one round: the numbers are errors, not timings).

Run: python -m benchmarks.bench_precision [--quick] [--out bench-precision.json]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from benchmarks.common import Results, bench_main
from merit_lab.config.schema import load_config
from merit_lab.data.formatting import tokenize_examples
from merit_lab.data.mixture import load_mixture
from merit_lab.gradients.estimate import estimate_gradients, grads_only_for, source_gradient
from merit_lab.gradients.sketch import SketchSpec, build_sketch
from merit_lab.models.fetch import RECORD, fetched_model_path
from merit_lab.models.loading import load_model, load_tokenizer, select_parameters

SECTION = "half-precision banks vs exact fp32"


def _cosines(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    iu = np.triu_indices(len(rows), 1)
    return (unit @ unit.T)[iu]


def _fp32_summed_bank(model, tok, mix, *, n: int, mbs: int, max_length: int) -> np.ndarray:
    """Each micro-batch's half-precision gradient sketched and summed in the float32 row."""
    selected = select_parameters(model)
    sk = build_sketch(SketchSpec(), [(nm, tuple(p.shape)) for nm, p in selected])
    rows = []
    with grads_only_for(model, selected):
        for s in mix:
            ex = tokenize_examples(tok, s.calibration, max_length, limit=n)
            row = sk.zeros()

            def drain(_loss: float, row=row) -> None:
                for nm, p in selected:
                    if p.grad is not None:
                        sk.add_(row, nm, p.grad)
                model.zero_grad(set_to_none=True)

            model.zero_grad(set_to_none=True)
            source_gradient(
                model, ex, pad_token_id=tok.pad_token_id, micro_batch_size=mbs, after_backward=drain
            )
            rows.append(row.numpy())
    return np.stack(rows)


def _measure(
    res: Results, label: str, model_name: str, mix, *, n: int, mbs: int, ml: int, fp16: bool
) -> None:
    tok = load_tokenizer(model_name)
    kw = dict(n=n, micro_batch_size=mbs, max_length=ml, progress=False)
    t0 = time.perf_counter()
    fp32 = load_model(model_name, device="cpu", dtype="float32")
    exact = _cosines(estimate_gradients(fp32, tok, mix, sketch=SketchSpec(kind="exact"), **kw).rows)
    variants = {"fp32, count-sketch": estimate_gradients(fp32, tok, mix, **kw).rows}
    del fp32
    bf16 = load_model(model_name, device="cpu", dtype="bfloat16")
    variants["bf16"] = estimate_gradients(bf16, tok, mix, **kw).rows
    variants["bf16, micro-batches summed in fp32"] = _fp32_summed_bank(
        bf16, tok, mix, n=n, mbs=mbs, max_length=ml
    )
    del bf16
    if fp16:
        f16 = load_model(model_name, device="cpu", dtype="float16")
        variants["fp16"] = estimate_gradients(f16, tok, mix, **kw).rows
    pairs = len(exact)
    for name, rows in variants.items():
        err = np.abs(_cosines(rows) - exact)
        note = f"{len(mix)} sources ({pairs} pairs), n = {n}, micro-batches of {mbs}"
        res.add(SECTION, f"{label}: {name}, max |cos err|", float(err.max()), note=note)
        res.add(SECTION, f"{label}: {name}, mean |cos err|", float(err.mean()))
        res.add(
            SECTION, f"{label}: {name}, Pearson", float(np.corrcoef(_cosines(rows), exact)[0, 1])
        )
    res.raw[label] = {
        "exact_cosine_range": [float(exact.min()), float(exact.max())],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"[precision] {label}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def run(quick: bool = False) -> Results:
    res = Results("precision")
    torch.manual_seed(0)
    demo = load_mixture("demo", calibration_n=200)
    demo = demo.select(demo.names[: 4 if quick else 16])
    _measure(res, "demo base", "demo", demo, n=16 if quick else 200, mbs=16, ml=256, fp16=True)
    cfg = load_config("configs/smollm2.yaml")
    if quick:
        return res
    if not (fetched_model_path("smollm2") / RECORD).is_file() or not cfg.mixture.path:
        res.skip(
            SECTION,
            "SmolLM2-135M",
            "run `merit-lab fetch-model smollm2` and `merit-lab fetch-data chatterbot` first",
        )
        return res
    try:
        chat = load_mixture(cfg.mixture.path, calibration_n=32)
        chat = chat.select(chat.names[:4])
    except FileNotFoundError as e:
        res.skip(SECTION, "SmolLM2-135M", str(e))
        return res
    _measure(res, "SmolLM2-135M", "smollm2", chat, n=32, mbs=8, ml=256, fp16=False)
    return res


if __name__ == "__main__":
    bench_main(run, __doc__)
