from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from merit_lab.analysis.convergence import (
    bootstrap_convergence,
    gradient_convergence,
    sketch_example_gradients,
)
from merit_lab.data.mixture import Mixture, Source
from merit_lab.gradients.estimate import estimate_gradients
from merit_lab.gradients.sketch import SketchSpec
from merit_lab.viz.plots import plot_gradient_convergence
from tests.conftest import chat

SPEC = SketchSpec(kind="countsketch", dim=2**12, seed=3)


def _examples(n: int, op: str = "add") -> list[dict]:
    # Responses of different lengths, so the token weights differ between examples.
    return [chat(f"{op} {a} {a * 7}", str(a * 8) * (1 + a % 3)) for a in range(n)]


def _noisy_rows(n: int = 50, dim: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=dim)[None, :] + 2.0 * rng.normal(size=(n, dim))
    return rows, rng.integers(1, 20, size=n)


def test_pooled_example_sketches_equal_the_bank_row(pico_model, demo_tokenizer):
    """Linearity: Σ n_i S(g_i) / Σ n_i is the sketch of the pooled mean-loss gradient."""
    examples = _examples(7)
    rows, tokens = sketch_example_gradients(pico_model, demo_tokenizer, examples, sketch=SPEC)
    assert rows.shape == (7, SPEC.dim) and rows.dtype == np.float32
    assert len(set(tokens.tolist())) > 1  # the weighting is really exercised
    mixture = Mixture((Source("s", train=(), calibration=tuple(examples), eval=()),))
    bank = estimate_gradients(
        pico_model,
        demo_tokenizer,
        mixture,
        sketch=SPEC,
        n=7,
        micro_batch_size=4,
        max_length=256,
        progress=False,
    )
    assert int(tokens.sum()) == bank.stats["s"]["n_response_tokens"]
    pooled = tokens @ rows.astype(np.float64) / tokens.sum()
    ref = bank.rows[0].astype(np.float64)
    np.testing.assert_allclose(pooled, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    # The unweighted mean is measurably different: the token weights matter.
    assert np.abs(rows.mean(axis=0) - ref).max() > 1e-3 * np.abs(ref).max()
    assert all(p.grad is None for p in pico_model.parameters())


def test_bootstrap_cosines_shape_range_and_trend():
    rows, tokens = _noisy_rows()
    df = bootstrap_convergence(rows, tokens, ns=(2, 10, 50, 80), n_boot=30, seed=1)
    assert list(df.columns) == ["n", "boot", "cosine"]
    assert sorted(df["n"].unique()) == [2, 10, 50]  # 80 > N = 50 is left out
    assert len(df) == 3 * 30 and df["cosine"].between(-1, 1).all()
    means = df.groupby("n")["cosine"].mean()
    assert means[2] < means[10] < means[50]
    again = bootstrap_convergence(rows, tokens, ns=(2, 10, 50), n_boot=30, seed=1)
    pd.testing.assert_frame_equal(df, again)


def test_subsampling_all_examples_gives_cosine_one():
    rows, tokens = _noisy_rows()
    df = bootstrap_convergence(rows, tokens, ns=(50,), n_boot=4, replace=False)
    np.testing.assert_allclose(df["cosine"], 1.0, atol=1e-12)


def test_single_example_samples_are_that_example_vs_token_weighted_mean():
    rows, tokens = _noisy_rows(n=6)
    full = tokens @ rows / tokens.sum()
    per_example = rows @ full / (np.linalg.norm(rows, axis=1) * np.linalg.norm(full))
    df = bootstrap_convergence(rows, tokens, ns=(1,), n_boot=40, seed=0)
    for c in df["cosine"]:
        assert np.min(np.abs(per_example - c)) < 1e-12


def test_bootstrap_rejects_bad_input():
    rows, tokens = _noisy_rows(n=5)
    with pytest.raises(ValueError, match="no sample size"):
        bootstrap_convergence(rows, tokens, ns=(10, 20))
    with pytest.raises(ValueError, match="response token"):
        bootstrap_convergence(rows, np.zeros(5), ns=(2,))


def test_gradient_convergence_per_source_and_plot(pico_model, demo_tokenizer):
    sources = {"add": _examples(6, "add"), "sub": _examples(6, "sub")}
    df = gradient_convergence(
        pico_model, demo_tokenizer, sources, ns=(2, 6), n_boot=5, sketch=SPEC, progress=False
    )
    assert list(df.columns) == ["source", "n", "boot", "cosine"]
    assert len(df) == 2 * 2 * 5 and df["cosine"].between(-1, 1).all()

    fig = plot_gradient_convergence(df)
    means = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in means] == ["add", "sub"]
    expected = df[df["source"] == "add"].groupby("n")["cosine"].mean()
    np.testing.assert_allclose(means[0].y, expected.to_numpy())
    assert list(means[0].x) == [2, 6]
    band = fig.data[0]
    q = df[df["source"] == "add"].groupby("n")["cosine"]
    np.testing.assert_allclose(band.y, [*q.quantile(0.95), *q.quantile(0.05)[::-1]])
