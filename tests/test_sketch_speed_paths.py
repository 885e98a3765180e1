"""The count-sketch's fast paths give the rows of its definition bit for bit.

The CPU pass reads cached int32 codes in chunks of `sketch._CHUNK_CPU` coordinates, fills the
cache with `_hash_codes` (fewer int64 passes than `_buckets_and_signs`), sums the fold passes
sign-split (`sketch_parallel`: one scatter a chunk, the signs applied once at the end), and can
return the gradient's squared norm from the same read (``square_norm``, the stage's row pass).
Each is checked here against an independent NumPy reference: uint64 hashing and float32 additions in
coordinate order (`np.add.at` is unbuffered and in order, as ``index_add_`` and
``scatter_add_`` on the CPU are).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import merit_lab.gradients.sketch as sk
from merit_lab.data.formatting import tokenize_examples
from merit_lab.data.mixture import load_mixture
from merit_lab.gradients.estimate import estimate_gradients, grads_only_for, source_gradient
from merit_lab.gradients.sketch import SketchSpec, build_sketch
from merit_lab.models.loading import select_parameters

CPU = torch.device("cpu")


def _reference_add(
    out, spec: SketchSpec, name: str, g: torch.Tensor, lo: int = 0, hi=None, split=False
):
    """Coordinates lo..hi-1 of ``name``'s count-sketch added into ``out`` by the definition, in
    NumPy: h(i) = a·i + b mod 2**64, bucket = top 32 bits × dim >> 32, sign −1 where bit 31 is
    set; float32 sums in coordinate order (`np.add.at` is unbuffered and in order). With
    ``split``, ``out`` has 2·dim slots and each coordinate is added as it is to slot 2·bucket
    (sign +1) or 2·bucket + 1 (sign −1)."""
    flat = g.detach().reshape(-1).to(torch.float32).numpy()
    hi = flat.size if hi is None else min(hi, flat.size)
    a, b = (np.uint64(x % 2**64) for x in sk._hash_coeffs(spec.seed, name))
    i = np.arange(lo, hi, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = i * a + b
    bucket = ((h >> np.uint64(32)) * np.uint64(spec.dim)) >> np.uint64(32)
    sign = np.where((h >> np.uint64(31)) & np.uint64(1), -1.0, 1.0).astype(np.float32)
    if split:
        np.add.at(out, 2 * bucket.astype(np.int64) + (sign < 0), flat[lo:hi])
    else:
        np.add.at(out, bucket.astype(np.int64), flat[lo:hi] * sign)


def _reference_row(spec: SketchSpec, grads: list[tuple[str, torch.Tensor]]) -> np.ndarray:
    """The count-sketch row by its definition (`_reference_add`), parameter after parameter."""
    row = np.zeros(spec.dim, dtype=np.float32)
    for name, g in grads:
        _reference_add(row, spec, name, g)
    return row


def test_hash_codes_pack_the_buckets_and_signs():
    """`_hash_codes` = 2·bucket + 1 where the sign is −1, else 2·bucket, for power-of-two and
    other dims (the largest cached, 2**30, uses every bit of the int32) and coordinates far past
    2**32; shifted, the code gives back the bucket and the float32 sign bit."""
    for dim in (2**18, 1000, 97, sk._CACHE_MAX_DIM):
        for start in (0, 2**31 - 3, 2**32 - 2, 10**10):
            bucket, sign = sk._buckets_and_signs(7, "layer.0.w", dim, start, start + 5000, CPU)
            code = sk._hash_codes(7, "layer.0.w", dim, start, start + 5000, CPU)
            want = (2 * bucket + (sign < 0).long()).to(torch.int32)
            assert code.dtype == torch.int32
            assert torch.equal(code, want)
            assert torch.equal(code.bitwise_right_shift(1).long(), bucket)
            sign_bit = code.bitwise_left_shift(31)
            assert torch.equal(sign_bit, torch.where(sign < 0, -(2**31), 0).to(torch.int32))
    assert int(bucket.max()) > 2**29  # dim 2**30 really reaches the top bucket bits
    assert int(code.max()) > 2**30


def test_a_dim_past_the_codes_hashes_every_pass(monkeypatch):
    """Above `_CACHE_MAX_DIM` nothing is cached and both passes still give their definition."""
    monkeypatch.setattr(sk, "_CACHE_MAX_DIM", 64)
    params = [("w", (30, 20)), ("v", (7,))]
    gen = torch.Generator().manual_seed(1)
    grads = [(n, torch.randn(s, generator=gen)) for n, s in params]
    for dim in (64, 65):
        spec = SketchSpec(dim=dim, seed=3)
        sketch = build_sketch(spec, params)
        want = _reference_row(spec, grads)
        for _ in range(2):
            np.testing.assert_array_equal(sketch.sketch(grads).numpy(), want)
            np.testing.assert_array_equal(
                sketch.sketch_parallel(grads, threads=2).numpy(),
                _reference_parts_row(spec, grads, sk._CHUNK_CPU),
            )
        assert bool(sketch._codes) == (dim == 64)


@pytest.mark.parametrize("chunk", [None, 1000])
def test_cached_fused_and_hashing_passes_equal_the_reference(monkeypatch, chunk):
    """Every CPU path (fill, cached, partly cached, hashing; with and without the fused norm;
    float32 and bfloat16) gives the NumPy reference row bit for bit, over parameters larger
    than the default chunk of 2**17 coordinates."""
    if chunk is not None:
        monkeypatch.setattr(sk, "_CHUNK_CPU", chunk)
    params = [("w", (400, 330)), ("b", (7,)), ("e", (3, 5000))]
    gen = torch.Generator().manual_seed(1)
    spec = SketchSpec(dim=4099, seed=11)
    for dtype in (torch.float32, torch.bfloat16):
        grads = [(n, torch.randn(s, generator=gen).to(dtype)) for n, s in params]
        grads[0][1].view(-1)[:50] = -0.0  # signed zeros flip sign as a product by ±1 would
        want = _reference_row(spec, grads)
        budgets = (None, 0, 4 * 140_000)  # everything; nothing; w plus part of e at chunk 1000
        for budget in budgets:
            sketch = build_sketch(spec, params, cache_bytes=budget)
            for _ in range(2):  # the pass that fills the cache, then one that reads it
                for square_norm in (False, True):
                    row = sketch.zeros()
                    for name, g in grads:
                        sketch.add_(row, name, g, square_norm=square_norm)
                    np.testing.assert_array_equal(row.numpy().view(np.int32), want.view(np.int32))


def test_square_norm_is_the_float64_norm_and_checks_finiteness():
    params = [("w", (300, 20)), ("v", (7,))]
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(300, 20, generator=gen)
    for kind in ("countsketch", "exact", "subsample"):
        sketch = build_sketch(SketchSpec(kind=kind, dim=64, every=3), params)
        for x in (g, g.to(torch.bfloat16), g.double() * 1e-3):
            want = float(torch.linalg.vector_norm(x.double()).square())
            got = sketch.add_(sketch.zeros(), "w", x, square_norm=True)
            assert got == pytest.approx(want, rel=1e-12)
        assert sketch.add_(sketch.zeros(), "w", g) is None  # no norm asked: none returned
    sketch = build_sketch(SketchSpec(dim=64), params)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = g.clone()
        x[123, 4] = bad
        with pytest.raises(ValueError, match="gradient of 'w' has non-finite entries"):
            sketch.add_(sketch.zeros(), "w", x, square_norm=True)
        assert not np.isfinite(sketch.add_(sketch.zeros(), "w", x, check=False, square_norm=True))
    # float64 entries whose squares overflow are finite: the norm is inf, nothing is refused
    huge = torch.full((7,), 1e200, dtype=torch.float64)
    assert sketch.add_(sketch.zeros(), "v", huge, square_norm=True) == float("inf")


def test_stage_rows_folds_and_norm_equal_a_plain_hashing_pass(pico_model, demo_tokenizer):
    """`estimate_gradients` (cached codes, fused norm, threaded fold passes) gives the rows and
    fold rows that an uncached sketch of the same summed gradients gives, bit for bit, and the
    exact float64 gradient norm."""
    mix = load_mixture("demo")
    mix = mix.select(mix.names[:2])
    spec = SketchSpec(dim=2**12, seed=4)
    kw = dict(n=6, micro_batch_size=4, max_length=128)
    bank = estimate_gradients(
        pico_model, demo_tokenizer, mix, sketch=spec, folds=2, progress=False, **kw
    )
    selected = select_parameters(pico_model)
    plain = build_sketch(spec, [(n, tuple(p.shape)) for n, p in selected], cache_bytes=0)
    for i, src in enumerate(mix):
        ex = tokenize_examples(demo_tokenizer, src.calibration, kw["max_length"], limit=kw["n"])
        cumulative: list[torch.Tensor] = []

        def after_fold(f: int, n_f: int, out: list = cumulative) -> None:
            grads = [(n, p.grad) for n, p in selected if p.grad is not None]
            # the fold passes sum in parts (sketch_parallel); the row, last, in coordinate order
            out.append(plain.sketch_parallel(grads, threads=1) if f == 0 else plain.sketch(grads))

        with grads_only_for(pico_model, selected):  # .grad cleared and flags restored after
            _, tokens = source_gradient(
                pico_model,
                ex,
                pad_token_id=demo_tokenizer.pad_token_id,
                micro_batch_size=kw["micro_batch_size"],
                folds=2,
                after_fold=after_fold,
            )
            grads = [p.grad.reshape(-1).double() for _, p in selected if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.cat(grads)))
        np.testing.assert_array_equal(
            bank.rows[i].view(np.int32), cumulative[-1].numpy().view(np.int32)
        )
        s = np.stack([np.zeros(spec.dim), *(c.numpy().astype(np.float64) for c in cumulative)])
        scale = tokens / np.asarray(bank.stats[src.name]["fold_tokens"], dtype=np.float64)
        folds = (np.diff(s, axis=0) * scale[:, None]).astype(np.float32)
        np.testing.assert_array_equal(bank.folds[i].view(np.int32), folds.view(np.int32))
        assert bank.stats[src.name]["grad_norm"] == pytest.approx(norm, rel=1e-12)


def _reference_parts_row(spec: SketchSpec, grads: list[tuple[str, torch.Tensor]], chunk: int):
    """`sketch_parallel`'s row by its definition: the pass's K chunks (over the parameters in
    order) cut into k = min(8, K // 32) (at least 1) runs of consecutive chunks; run p summed
    into part p in float32 in coordinate order, sign-split (coordinate i, unsigned, into slot
    2·bucket + 1 where its sign is −1, else 2·bucket); in float64 the parts' even slots summed,
    and their odd slots, the second taken from the first, rounded once."""
    chunks = [(name, g, lo) for name, g in grads for lo in range(0, g.numel(), chunk)]
    k = max(1, min(sk._PARTS, len(chunks) // sk._PART_CHUNKS))
    parts = np.zeros((k, 2 * spec.dim), dtype=np.float32)
    for p in range(k):  # run p: chunks K·p // k .. K·(p + 1) // k − 1
        for name, g, lo in chunks[len(chunks) * p // k : len(chunks) * (p + 1) // k]:
            _reference_add(parts[p], spec, name, g, lo, lo + chunk, split=True)
    wide = parts.astype(np.float64)
    return (wide[:, 0::2].sum(axis=0) - wide[:, 1::2].sum(axis=0)).astype(np.float32)


def test_parallel_pass_is_its_definition_for_any_thread_count(monkeypatch):
    """`sketch_parallel` = the NumPy parts reference bit for bit, with 1, 2, 3 and 16 threads,
    filling the cache, reading it, partly cached and uncached; float32 and bfloat16; and the
    plain pass's row to float32 rounding (the same map, another order of sums)."""
    monkeypatch.setattr(sk, "_CHUNK_CPU", 1000)
    params = [("w", (40, 330)), ("b", (7,)), ("e", (3, 2500)), ("v", (900,))]
    gen = torch.Generator().manual_seed(3)
    spec = SketchSpec(dim=257, seed=5)
    for dtype in (torch.float32, torch.bfloat16):
        grads = [(n, torch.randn(s, generator=gen).to(dtype)) for n, s in params]
        assert 3 * sk._PARTS == 14 + 1 + 8 + 1  # 24 chunks
        # 8 parts of 3 chunks, 4 of 6, 1 of 24 (a part holds at least _PART_CHUNKS chunks)
        for part_chunks in (3, 5, 32):
            monkeypatch.setattr(sk, "_PART_CHUNKS", part_chunks)
            want = _reference_parts_row(spec, grads, 1000)
            for budget in (None, 0, 4 * 9000):  # everything; nothing; part of w
                sketch = build_sketch(spec, params, cache_bytes=budget)
                for threads in (1, 2, 3, 16, 1):  # the first call fills the cache
                    row = sketch.sketch_parallel(grads, threads=threads)
                    np.testing.assert_array_equal(row.numpy().view(np.int32), want.view(np.int32))
                if budget == 4 * 9000:
                    assert len(sketch._codes) == 9  # the budget held 9 chunks of 1000, no more
        plain = build_sketch(spec, params).sketch(grads).numpy()
        np.testing.assert_allclose(want, plain, rtol=0, atol=1e-5 * np.abs(plain).max())
        assert not np.array_equal(want, plain)  # the order of sums is really another


def test_parallel_pass_checks_names_and_falls_back_off_the_cpu_count_sketch():
    params = [("w", (30, 20)), ("v", (7,))]
    g = torch.randn(30, 20, generator=torch.Generator().manual_seed(4))
    sketch = build_sketch(SketchSpec(dim=64), params)
    with pytest.raises(ValueError, match="parameter 'x' was not declared"):
        sketch.sketch_parallel([("x", g)])
    with pytest.raises(ValueError, match=r"gradient of 'w' has shape \(20, 30\)"):
        sketch.sketch_parallel([("w", g.T)])
    for kind in ("exact", "subsample", "gaussian"):  # the plain pass, bit for bit
        other = build_sketch(SketchSpec(kind=kind, dim=64, every=3), params)
        np.testing.assert_array_equal(
            other.sketch_parallel([("w", g)], threads=2).numpy(), other.sketch([("w", g)]).numpy()
        )
