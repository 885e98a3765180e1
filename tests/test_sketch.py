"""Tests for merit_lab.gradients.sketch: determinism, unbiasedness, fidelity, and input
validation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from merit_lab.gradients import sketch as sk
from merit_lab.gradients.sketch import (
    DEFAULT_SKETCH_DIM,
    SketchSpec,
    build_sketch,
    bytes_per_source,
    sketch_fidelity,
)

PARAMS = [("embed.weight", (37, 8)), ("layer.0.w", (16, 16)), ("layer.0.b", (16,)), ("head", (5,))]
N_PARAMS = sum(int(np.prod(s)) for _, s in PARAMS)


def _grads(seed: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.randn(s, generator=gen)) for n, s in PARAMS]


def _flat(grads: list[tuple[str, torch.Tensor]]) -> np.ndarray:
    return torch.cat([g.reshape(-1) for _, g in grads]).double().numpy()


def _correlated_rows(t: int, n: int, seed: int = 0) -> np.ndarray:
    """(t, n) float32: rank-4 shared structure plus heavy-tailed noise; cosines in ~[-0.6, 0.6]."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((4, n))
    z = rng.standard_normal((t, 4)) * np.array([3.0, 2.0, 1.2, 0.8])
    return (z @ basis + 2.0 * rng.standard_t(3, size=(t, n))).astype(np.float32)


def _sketch_rows(x: np.ndarray, spec: SketchSpec) -> np.ndarray:
    s = build_sketch(spec, [("flat", (x.shape[1],))])
    return np.stack([s.sketch([("flat", torch.from_numpy(r))]).numpy() for r in x])


def test_spec_round_trip_and_validation():
    assert SketchSpec().dim == DEFAULT_SKETCH_DIM
    spec = SketchSpec(kind="subsample", dim=123, seed=7, every=3)
    assert SketchSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown sketch kind"):
        SketchSpec(kind="fft")
    with pytest.raises(ValueError, match="dim"):
        SketchSpec(dim=0)
    with pytest.raises(ValueError, match="every"):
        SketchSpec(kind="subsample", every=0)
    with pytest.raises(ValueError, match="unknown SketchSpec fields"):
        SketchSpec.from_dict({"kind": "exact", "width": 3})


def test_countsketch_hash_matches_python_reference():
    # The int64 tensor arithmetic must equal exact unsigned 64-bit arithmetic, also far past
    # 2**31, or rows would silently differ between platforms.
    seed, name, dim = 3, "layer.7.mlp.weight", 1000
    a, b = (x % 2**64 for x in sk._hash_coeffs(seed, name))
    for start in (0, 2**31 - 3, 2**32 - 2, 10**10):
        bucket, sign = sk._buckets_and_signs(seed, name, dim, start, start + 4, torch.device("cpu"))
        for j, i in enumerate(range(start, start + 4)):
            h = (a * i + b) % 2**64
            assert bucket[j].item() == ((h >> 32) * dim) >> 32
            assert sign[j].item() == (-1.0 if (h >> 31) & 1 else 1.0)


def test_countsketch_buckets_and_signs_are_balanced():
    bucket, sign = sk._buckets_and_signs(0, "w", 64, 0, 64 * 2000, torch.device("cpu"))
    counts = torch.bincount(bucket, minlength=64).numpy()
    assert counts.min() > 1800 and counts.max() < 2200  # 2000 ± ~4.5 sd
    assert abs(sign.mean().item()) < 0.01


def test_countsketch_independent_of_order_declared_set_and_chunking(monkeypatch):
    spec = SketchSpec(dim=64, seed=5)
    grads = _grads(0)
    forward = build_sketch(spec, PARAMS)
    backward = build_sketch(spec, PARAMS[::-1])
    subset = build_sketch(spec, PARAMS[1:2])
    for name, g in grads:
        a, b = forward.zeros(), backward.zeros()
        forward.add_(a, name, g)
        backward.add_(b, name, g)
        assert torch.equal(a, b)
    c = subset.zeros()
    subset.add_(c, grads[1][0], grads[1][1])
    d = forward.zeros()
    forward.add_(d, grads[1][0], grads[1][1])
    assert torch.equal(c, d)
    row = forward.sketch(grads)
    torch.testing.assert_close(row, backward.sketch(grads[::-1]), rtol=0, atol=1e-5)
    monkeypatch.setattr(sk, "_CHUNK_CPU", 13)
    assert torch.equal(forward.sketch(grads), row)


def test_countsketch_same_row_in_a_fresh_process():
    # Nothing may depend on process state (PYTHONHASHSEED, global RNG): a fresh interpreter
    # must give the bit-identical row, which is what lets workers' banks concatenate.
    code = textwrap.dedent(
        """
        import torch
        from merit_lab.gradients.sketch import SketchSpec, build_sketch
        torch.manual_seed(123)
        g = torch.arange(300, dtype=torch.float32).sin().reshape(20, 15)
        row = build_sketch(SketchSpec(dim=32, seed=9), [("w", (20, 15))]).sketch([("w", g)])
        print(",".join(repr(v) for v in row.tolist()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "77"},
    ).stdout
    g = torch.arange(300, dtype=torch.float32).sin().reshape(20, 15)
    row = build_sketch(SketchSpec(dim=32, seed=9), [("w", (20, 15))]).sketch([("w", g)])
    assert [float(v) for v in out.strip().split(",")] == row.tolist()


@pytest.mark.parametrize(("kind", "n_seeds"), [("countsketch", 1000), ("gaussian", 600)])
def test_inner_products_preserved_in_expectation(kind, n_seeds):
    x, y = _grads(1), _grads(2)
    # Make x and y correlated so the target inner product is far from zero.
    y = [(n, 0.6 * gx + 0.4 * gy) for (n, gx), (_, gy) in zip(x, y, strict=True)]
    true_xy = float(_flat(x) @ _flat(y))
    true_xx = float(_flat(x) @ _flat(x))
    est_xy, est_xx = [], []
    for seed in range(n_seeds):
        s = build_sketch(SketchSpec(kind=kind, dim=16, seed=seed), PARAMS)
        sx, sy = s.sketch(x).double(), s.sketch(y).double()
        est_xy.append(float(sx @ sy))
        est_xx.append(float(sx @ sx))
    for est, true in [(est_xy, true_xy), (est_xx, true_xx)]:
        est = np.array(est)
        se = est.std(ddof=1) / np.sqrt(len(est))
        assert abs(est.mean() - true) < 4 * se, (kind, est.mean(), true, se)
        assert se < 0.05 * abs(true)  # the check above has teeth


def test_countsketch_fidelity_improves_with_dim():
    x = _correlated_rows(16, 2**17)
    results = {
        dim: sketch_fidelity(x, _sketch_rows(x, SketchSpec(dim=dim, seed=1)))
        for dim in (2**8, 2**11, 2**14)
    }
    pearson = [results[d]["pearson"] for d in sorted(results)]
    max_err = [results[d]["max_abs_error"] for d in sorted(results)]
    assert pearson == sorted(pearson)
    assert max_err == sorted(max_err, reverse=True)
    # Cosine error std ≈ sqrt((1 + cos²) / dim): ~0.008 at 2**14, over 120 pairs.
    # Measured (seeds 1-3): pearson 0.9990-0.9996, max error 0.017-0.031, mean 0.005-0.008.
    assert results[2**14]["pearson"] > 0.997
    assert results[2**14]["max_abs_error"] < 0.05
    assert results[2**14]["mean_abs_error"] < 0.012
    assert results[2**8]["pearson"] > 0.9


def test_sketch_fidelity_of_identical_rows():
    x = _correlated_rows(5, 1000)
    f = sketch_fidelity(x, 2.0 * x)
    assert f["pearson"] == pytest.approx(1.0)
    assert f["max_abs_error"] < 1e-12
    assert f["n_pairs"] == 10
    assert np.isnan(sketch_fidelity(x[:2], x[:2])["pearson"])  # one pair: undefined
    with pytest.raises(ValueError):
        sketch_fidelity(x, x[:3])


def test_exact_is_the_concatenation():
    grads = _grads(3)
    s = build_sketch(SketchSpec(kind="exact"), PARAMS)
    assert s.dim == N_PARAMS
    # Given in a different order than declared: placement follows the declaration.
    row = s.sketch(grads[::-1])
    np.testing.assert_array_equal(row.double().numpy(), _flat(grads))


@pytest.mark.parametrize(("seed", "every"), [(0, 5), (1, 5), (2, 3), (4, 1)])
def test_subsample_keeps_global_residue_class(seed, every):
    grads = _grads(4)
    spec = SketchSpec(kind="subsample", seed=seed, every=every)
    s = build_sketch(spec, PARAMS)
    offset = sk._subsample_offset(seed, every)
    expected = _flat(grads)[offset::every]
    assert s.dim == expected.size == bytes_per_source(spec, N_PARAMS) // 4
    np.testing.assert_array_equal(s.sketch(grads[::-1]).double().numpy(), expected)


def test_gaussian_is_a_fixed_linear_map_with_the_right_scale():
    spec = SketchSpec(kind="gaussian", dim=256, seed=2)
    params = [("a", (300,)), ("b", (20, 10))]
    s = build_sketch(spec, params)
    # Columns of the map: sketch each basis vector.
    cols = []
    for name, shape in params:
        for i in range(int(np.prod(shape))):
            e = torch.zeros(int(np.prod(shape)))
            e[i] = 1.0
            row = s.zeros()
            s.add_(row, name, e.reshape(shape))
            cols.append(row.double().numpy())
    m = np.stack(cols, axis=1)  # (dim, n)
    assert abs(m.mean()) < 0.01 / np.sqrt(spec.dim) * 10
    assert m.var() * spec.dim == pytest.approx(1.0, abs=0.02)
    gen = torch.Generator().manual_seed(0)
    grads = [(n, torch.randn(sh, generator=gen)) for n, sh in params]
    np.testing.assert_allclose(s.sketch(grads).double().numpy(), m @ _flat(grads), atol=1e-4)


def test_low_precision_grads_are_accepted():
    s = build_sketch(SketchSpec(dim=32), PARAMS)
    grads = _grads(5)
    bf16 = [(n, g.to(torch.bfloat16)) for n, g in grads]
    up = [(n, g.float()) for n, g in bf16]
    assert torch.equal(s.sketch(bf16), s.sketch(up))


@pytest.mark.parametrize("kind", sk.SKETCH_KINDS)
def test_rejects_bad_gradients_naming_the_parameter(kind):
    s = build_sketch(SketchSpec(kind=kind, dim=32), PARAMS)
    row = s.zeros()
    with pytest.raises(ValueError, match=r"layer\.0\.w.*shape"):
        s.add_(row, "layer.0.w", torch.zeros(16, 15))
    with pytest.raises(ValueError, match="not declared"):
        s.add_(row, "nope", torch.zeros(3))
    for bad in (float("nan"), float("inf"), -float("inf")):
        g = torch.zeros(16, 16)
        g[3, 4] = bad
        with pytest.raises(ValueError, match=r"layer\.0\.w.*non-finite"):
            s.add_(row, "layer.0.w", g)
    with pytest.raises(ValueError, match="row must be"):
        s.add_(torch.zeros(3), "head", torch.zeros(5))
    # Finite entries whose sum overflows are fine.
    s.add_(s.zeros(), "head", torch.full((5,), 3e38))


def test_duplicate_parameter_declaration():
    with pytest.raises(ValueError, match="declared twice"):
        build_sketch(SketchSpec(), [("a", (2,)), ("a", (3,))])


def test_bytes_per_source():
    assert bytes_per_source(SketchSpec(), 10**9) == 4 * DEFAULT_SKETCH_DIM
    assert bytes_per_source(SketchSpec(kind="exact"), 1000) == 4000
    spec = SketchSpec(kind="subsample", every=5, seed=3)
    n = bytes_per_source(spec, 1001) // 4
    assert n in (200, 201)
    assert n == build_sketch(spec, [("w", (1001,))]).dim


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_countsketch_cpu_and_cuda_agree():
    cuda = torch.device("cuda")
    b_cpu, s_cpu = sk._buckets_and_signs(1, "w", 1000, 0, 10**6, torch.device("cpu"))
    b_gpu, s_gpu = sk._buckets_and_signs(1, "w", 1000, 0, 10**6, cuda)
    assert torch.equal(b_cpu, b_gpu.cpu())
    assert torch.equal(s_cpu, s_gpu.cpu())
    spec = SketchSpec(dim=4096, seed=1)
    grads = _grads(6)
    row_cpu = build_sketch(spec, PARAMS).sketch(grads)
    row_gpu = build_sketch(spec, PARAMS, device=cuda).sketch([(n, g.cuda()) for n, g in grads])
    torch.testing.assert_close(row_gpu.cpu(), row_cpu, rtol=1e-5, atol=1e-5)


def test_sketch_flat_equals_per_parameter_sketch():
    params = [("a", (3, 4)), ("b", (5,)), ("c", (2, 2, 2))]
    gen = torch.Generator().manual_seed(0)
    grads = [(n, torch.randn(s, generator=gen)) for n, s in params]
    flat = torch.cat([g.flatten() for _, g in grads])
    for spec in (SketchSpec(dim=16, seed=3), SketchSpec(kind="subsample", every=2)):
        sk = build_sketch(spec, params)
        torch.testing.assert_close(sk.sketch_flat(flat), sk.sketch(grads), rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected 25"):
        build_sketch(SketchSpec(dim=16), params).sketch_flat(flat[:-1])


def test_cached_hashes_give_the_same_map(monkeypatch):
    """Count-sketch with its buckets and signs cached (int32, sign in the top bit; the GPU
    default) equals the uncached map bitwise, on the first call and on the cached ones; a
    budget that fits only some parameters caches those and hashes the rest."""
    monkeypatch.setattr(sk, "_CHUNK_CPU", 1000)  # several chunks per parameter
    params = [("a", (70, 50)), ("b", (3001,)), ("c", (4, 4))]
    gen = torch.Generator().manual_seed(0)
    grads = [(n, torch.randn(s, generator=gen)) for n, s in params]
    spec = SketchSpec(dim=257, seed=5)
    plain = build_sketch(spec, params, cache_bytes=0)
    cached = build_sketch(spec, params, cache_bytes=10**9)
    part = build_sketch(spec, params, cache_bytes=4 * 3500)  # a's 3500 entries, then nothing
    ref = plain.sketch(grads)
    for _ in range(2):  # the first call fills the cache, the second reads it
        assert torch.equal(cached.sketch(grads), ref)
        assert torch.equal(part.sketch(grads), ref)
    assert sum(c.numel() for c in cached._codes.values()) == 3500 + 3001 + 16
    assert sum(c.numel() for c in part._codes.values()) == 3500
    assert not plain._codes
    # at the largest cached dim the code uses every bit of the int32: it still round-trips
    dim = sk._CACHE_MAX_DIM
    bucket, sign = sk._buckets_and_signs(5, "b", dim, 0, 100_000, torch.device("cpu"))
    assert int(bucket.max()) > 2**29
    code = sk._hash_codes(5, "b", dim, 0, 100_000, torch.device("cpu"))
    assert torch.equal(code.bitwise_right_shift(1).long(), bucket)
    assert torch.equal(code.bitwise_and(1) == 1, sign < 0)


def test_cpu_code_cache_gives_bit_identical_rows(monkeypatch):
    """The CPU cache of codes (sign bit XOR-ed into the value) gives the rows of the hashing
    path bit for bit, for float32 and bfloat16 gradients, signed zeros, a parameter only partly
    cached (the budget runs out mid-way) and unchecked passes."""
    monkeypatch.setattr(sk, "_CHUNK_CPU", 64)
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    g[::7], g[1::7] = 0.0, -0.0
    params = [("w", (1000,)), ("b", (10,))]
    plain = build_sketch(SketchSpec(dim=97, seed=2), params, cache_bytes=0)
    for budget in (None, 4 * 300):  # all of it; the first 4 chunks only
        cached = build_sketch(SketchSpec(dim=97, seed=2), params, cache_bytes=budget)
        for grad in (g, g.to(torch.bfloat16)):
            want = plain.sketch([("w", grad), ("b", grad[:10])])
            for _ in range(2):  # the pass that fills the cache, then one that reads it
                assert torch.equal(cached.sketch([("w", grad), ("b", grad[:10])]), want)
            row = cached.zeros()
            cached.add_(row, "w", grad, check=False)
            cached.add_(row, "b", grad[:10], check=False)
            assert torch.equal(row, want)
    assert len(cached._codes) == 5  # 4 of the 16 chunks of w (1024 bytes), then b (40)
