"""Split stability: the bootstrap over calibration examples, on gradients of known structure."""

from __future__ import annotations

import json

import numpy as np
import pytest

from merit_lab.envelope import EnvelopeError
from merit_lab.partition.stability import (
    UNSTABLE_ARI,
    SplitStability,
    bootstrap_split_stability,
    recommend_n,
    stability_warning,
)

NAMES = [f"s{t}" for t in range(8)]
COUNTS = {s: 100 for s in NAMES}
TOKENS = {s: 1000 for s in NAMES}


def _mixture(separation: float, seed: int = 0, n: int = 40, d: int = 256, noise: float = 3.0):
    """8 sources of n rows: two planted clusters of 4 (±separation along one axis) or, at 0,
    no structure; each row is its source's mean plus isotropic noise."""
    rng = np.random.default_rng(seed)
    base, axis = rng.normal(size=d), rng.normal(size=d)
    rows, sources = [], []
    for t, s in enumerate(NAMES):
        mu = base + separation * (1 if t % 2 else -1) * axis + 0.3 * rng.normal(size=d)
        rows.append(mu + noise * rng.normal(size=(n, d)))
        sources += [s] * n
    return np.vstack(rows), rng.integers(5, 20, size=8 * n), sources


def test_well_separated_split_is_stable_and_structureless_is_not():
    rows, tokens, sources = _mixture(1.0)
    st = bootstrap_split_stability(
        rows,
        tokens,
        sources,
        NAMES,
        examples=COUNTS,
        train_tokens=TOKENS,
        rs=(1,),
        n_boot=60,
        seed=0,
    )
    assert np.median(st.ari[1]) == 1.0 and st.ari[1].min() == 1.0
    np.testing.assert_array_equal(
        st.reference[1] % 2 == st.reference[1][1] % 2, [t % 2 == 1 for t in range(8)]
    )  # the planted clusters
    assert stability_warning(st, 1) == ""
    odd = np.arange(8) % 2 == 1
    co = st.coassign[1]
    assert co[np.ix_(odd, odd)].min() == 1.0 and co[np.ix_(odd, ~odd)].max() == 0.0

    rows, tokens, sources = _mixture(0.0)
    flat = bootstrap_split_stability(
        rows,
        tokens,
        sources,
        NAMES,
        examples=COUNTS,
        train_tokens=TOKENS,
        rs=(1,),
        n_boot=60,
        seed=0,
    )
    assert np.median(flat.ari[1]) < 0.3
    assert flat.summary().loc[1, "unstable"]
    assert "median ARI" in stability_warning(flat, 1) and str(UNSTABLE_ARI) in stability_warning(
        flat, 1
    )


def test_cosine_spread_matches_the_sampling_noise():
    rows, tokens, sources = _mixture(1.0)
    st = bootstrap_split_stability(
        rows,
        tokens,
        sources,
        NAMES,
        examples=COUNTS,
        train_tokens=TOKENS,
        rs=(1,),
        n_boot=100,
        seed=1,
    )
    # point estimate: the cosine of the token-weighted means
    src = np.array(sources)
    means = np.stack([tokens[src == s] @ rows[src == s] / tokens[src == s].sum() for s in NAMES])
    ref = means @ means.T / np.outer(np.linalg.norm(means, axis=1), np.linalg.norm(means, axis=1))
    np.testing.assert_allclose(st.cosine, ref, atol=1e-5)
    iu = np.triu_indices(8, k=1)
    assert np.all(st.cosine_lo[iu] < st.cosine_hi[iu])
    # resampled means are noisier than the all-example mean, so their norms grow and their
    # cosines shrink towards 0: the bootstrap bias is negative for the planted 0.85 pairs
    high = st.cosine[iu] > 0.5
    assert np.all(st.cosine_bias[iu][high] < -0.01)
    # a source mean of 40 rows with noise 3 in 256 dims moves its cosines by ~0.02-0.03
    assert 0.01 < np.median(st.cosine_std[iu]) < 0.05
    assert np.median(st.pearson) > 0.99
    table = st.pair_table()
    assert len(table) == 28 and table["std"].gt(0).all()
    back = SplitStability.from_dict(st.to_dict())
    np.testing.assert_array_equal(back.ari[1], st.ari[1])
    np.testing.assert_array_equal(back.coassign[1], st.coassign[1])


def test_recommend_n_recovers_the_noise_to_signal_ratio():
    rng = np.random.default_rng(2)
    d, n = 256, 200
    mu = np.ones(d)
    rows = mu + 3.0 * rng.normal(size=(n, d))  # k = dσ²/|ḡ|² ≈ 2304 / 267.5 ≈ 8.6
    rec = recommend_n(rows, np.ones(n), ["a"] * n, ns=(10, 20, 40, 80, 160, 200), n_boot=50)
    g = rows.mean(axis=0)
    k_true = ((rows - g) ** 2).sum(axis=1).mean() / (g @ g)
    assert rec["k"]["a"] == pytest.approx(k_true, rel=0.2)
    # cos² = n/(n+k) ≥ 0.95² needs n ≥ k·0.9025/0.0975 ≈ 80; the measured curve agrees
    assert rec["n"] == 160 or rec["n"] == 80
    assert rec["n_extrapolated"] == pytest.approx(k_true * 0.9025 / 0.0975, rel=0.25)


def test_bad_input_is_refused_before_work():
    rows, tokens, sources = _mixture(1.0)
    with pytest.raises(ValueError, match="no example rows"):
        bootstrap_split_stability(
            rows, tokens, sources, [*NAMES, "zz"], examples=COUNTS, train_tokens=TOKENS, rs=(1,)
        )
    with pytest.raises(ValueError, match="2\\^r"):
        bootstrap_split_stability(
            rows, tokens, sources, NAMES, examples=COUNTS, train_tokens=TOKENS, rs=(4,)
        )


def test_stability_json_is_enveloped_and_a_foreign_or_newer_one_refused(tmp_path):
    """stability.json carried the header from the start: `save` writes it, `load` round-trips
    every array exactly and refuses another format, a newer version and a header-less file."""
    rows, tokens, sources = _mixture(4.0, n=6, d=32)
    st = bootstrap_split_stability(
        rows, tokens, sources, NAMES, examples=COUNTS, train_tokens=TOKENS, rs=(1,), n_boot=4
    )
    path = st.save(tmp_path / "stability.json")
    doc = json.loads(path.read_text())
    assert list(doc)[:2] == ["format", "version"]
    assert (doc["format"], doc["version"]) == ("merit-lab/stability", 1)
    assert doc == st.to_dict()
    back = SplitStability.load(path)
    assert back.names == st.names and back.info == st.info
    np.testing.assert_array_equal(back.cosine_std, st.cosine_std)
    np.testing.assert_array_equal(back.reference[1], st.reference[1])
    cases = [
        ({**doc, "version": 2}, "stability.json: merit-lab/stability version 2 is not one"),
        ({**doc, "format": "merit-lab/drift"}, "holds 'merit-lab/drift', not 'merit-lab/stab"),
        ({k: v for k, v in doc.items() if k not in ("format", "version")}, "holds None"),
    ]
    for bad, match in cases:
        path.write_text(json.dumps(bad))
        with pytest.raises(EnvelopeError, match=match):
            SplitStability.load(path)
        with pytest.raises(EnvelopeError, match=match.removeprefix("stability.json: ")):
            SplitStability.from_dict(bad)
