"""Examples inside the conflict space: coordinates, pair shares, outliers, storage."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merit_lab.analysis.conflict import compute_conflict_space
from merit_lab.analysis.examples import (
    ExampleSketches,
    cosine_shares,
    dots_to_rows,
    example_coordinates,
    flag_outliers,
    pair_contributions,
    resketch,
    weighted_mean,
)
from merit_lab.envelope import EnvelopeError


def _synthetic(seed: int = 0, t: int = 4, n: int = 30, d: int = 64):
    """t sources of n example rows each; the bank rows are their token-weighted means."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(t, d))
    rows = np.vstack([c + 1.5 * rng.normal(size=(n, d)) for c in centres])
    tokens = rng.integers(3, 30, size=t * n)
    sources = [f"s{i}" for i in range(t) for _ in range(n)]
    names = [f"s{i}" for i in range(t)]
    bank = np.stack(
        [weighted_mean(rows[i * n : (i + 1) * n], tokens[i * n : (i + 1) * n]) for i in range(t)]
    )
    dots, norms = dots_to_rows(rows, bank)
    sk = ExampleSketches(
        sources=sources,
        ids=[f"e{i}" for i in range(t * n)],
        tokens=tokens,
        dots=dots,
        norms=norms,
        bank_names=names,
        bank_norms=np.linalg.norm(bank, axis=1),
        rows=resketch(rows, 32),
        texts=[f"text {i}" for i in range(t * n)],
    )
    return rows, tokens, bank, names, sk


def test_shares_sum_to_the_cosine_exactly():
    rows, tokens, bank, names, sk = _synthetic()
    a = rows[:30]
    g_a, g_b = weighted_mean(a, tokens[:30]), bank[2]
    shares = cosine_shares(a @ g_b, tokens[:30], np.linalg.norm(g_a), np.linalg.norm(g_b))
    cos = g_a @ g_b / (np.linalg.norm(g_a) * np.linalg.norm(g_b))
    assert shares.sum() == pytest.approx(cos, abs=1e-14)
    # unweighted: share_i = <g_i, g_B> / (n_A |g_A||g_B|), the formula of the issue
    ones = np.ones(30)
    g_u = a.mean(axis=0)
    shares_u = cosine_shares(a @ g_b, ones, np.linalg.norm(g_u), np.linalg.norm(g_b))
    ref = (a @ g_b) / (30 * np.linalg.norm(g_u) * np.linalg.norm(g_b))
    np.testing.assert_allclose(shares_u, ref, rtol=1e-13)
    # through the table: sorted most-against first, summing to the bank cosine
    table = pair_contributions(sk, "s0", "s2")
    space = compute_conflict_space(bank, names)
    assert table["share"].sum() == pytest.approx(space.cosine[0, 2], abs=1e-12)
    assert table["share"].is_monotonic_increasing
    assert list(table.columns) == ["id", "text", "tokens", "share", "cosine_to_b"]


def test_coordinates_use_the_sources_centring_and_basis():
    _rows, _tokens, bank, names, sk = _synthetic()
    space = compute_conflict_space(bank, names)
    z = example_coordinates(space, sk)
    for i in range(0, 120, 17):  # each example as ConflictSpace.project sees it
        np.testing.assert_allclose(z[i], space.project(sk.cosines()[i]), atol=1e-12)
    # an "example" equal to a source's own gradient lands on that source's point
    dots, norms = dots_to_rows(bank, bank)
    own = ExampleSketches(
        sources=names,
        ids=names,
        tokens=np.ones(4),
        dots=dots,
        norms=norms,
        bank_names=names,
        bank_norms=norms,
        rows=bank,
    )
    np.testing.assert_allclose(example_coordinates(space, own), space.embedding, atol=1e-10)


def test_outliers_are_the_examples_pointing_away_from_their_source():
    rows, tokens, bank, names, sk = _synthetic()
    rows = rows.copy()
    rows[5] = -3 * bank[0]  # an example of s0 that points against s0
    dots, norms = dots_to_rows(rows, bank)
    flipped = ExampleSketches(
        sources=sk.sources,
        ids=sk.ids,
        tokens=tokens,
        dots=dots,
        norms=norms,
        bank_names=names,
        bank_norms=sk.bank_norms,
        rows=sk.rows,
    )
    flags = flag_outliers(flipped.own_cosine(), flipped.sources)
    before = flag_outliers(sk.own_cosine(), sk.sources)
    assert flags[5] and not before[5]
    assert np.argmin(flipped.table()["robust_z"].to_numpy()[:30]) == 5
    # the rule by hand: modified z below -3.5 within s0
    c = flipped.own_cosine()[:30]
    med = np.median(c)
    mad = np.median(np.abs(c - med))
    assert 0.6745 * (c[5] - med) / mad < -3.5
    table = flipped.table(compute_conflict_space(bank, names))
    assert table.loc[5, "outlier"] and table["z0"].notna().all()


def test_resketch_is_linear_and_keeps_inner_products():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 4096))
    y = resketch(x, 1024, seed=3)
    np.testing.assert_allclose(
        resketch(x[:1] + 2 * x[1:2], 1024, seed=3), y[:1] + 2 * y[1:2], rtol=1e-5, atol=1e-4
    )
    np.testing.assert_array_equal(resketch(x[2:], 1024, seed=3), y[2:])  # same map per call
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    assert abs(cos(y[0], y[0] + y[1]) - cos(x[0], x[0] + x[1])) < 0.1


def test_save_load_round_trip_and_bad_file(tmp_path):
    *_, sk = _synthetic()
    path = sk.save(tmp_path / "examples.safetensors")
    back = ExampleSketches.load(path)
    assert back.ids == sk.ids and back.texts == sk.texts and back.sources == sk.sources
    np.testing.assert_array_equal(back.dots, sk.dots)
    np.testing.assert_array_equal(back.rows, sk.rows)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="bad.safetensors: not a readable"):
        ExampleSketches.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="without a bank row"):
        ExampleSketches(
            sources=["x"],
            ids=["1"],
            tokens=[1],
            dots=np.zeros((1, 4)),
            norms=[1.0],
            bank_names=sk.bank_names,
            bank_norms=sk.bank_norms,
            rows=np.zeros((1, 2)),
        )


def test_sketch_file_is_enveloped_and_a_legacy_one_still_loads(tmp_path):
    """The header sits in the safetensors metadata; a newer version or another format (an HF
    weights file says "pt") is refused naming the file; a file without it reads as version 1."""
    *_, sk = _synthetic(t=2, n=3)
    path = sk.save(tmp_path / "examples.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    assert (meta["format"], meta["version"]) == ("merit-lab/example-sketches", "1")
    cases = [
        ({**meta, "version": "2"}, "merit-lab/example-sketches version 2 is not one"),
        ({**meta, "format": "pt"}, "this file holds 'pt', not 'merit-lab/example-sketches'"),
    ]
    for bad, match in cases:
        save_file(tensors, str(path), metadata=bad)
        with pytest.raises(EnvelopeError, match="examples.safetensors: " + match):
            ExampleSketches.load(path)
    legacy = {k: v for k, v in meta.items() if k not in ("format", "version")}
    save_file(tensors, str(path), metadata=legacy)
    back = ExampleSketches.load(path)
    assert back.ids == sk.ids and back.bank_names == sk.bank_names
    np.testing.assert_array_equal(back.rows, sk.rows)


def test_self_shares_sum_to_one_and_flag_a_dominant_example():
    rows, tokens, bank, names, sk = _synthetic()
    np.testing.assert_allclose(
        np.bincount([int(s[1]) for s in sk.sources], weights=sk.self_share()), 1.0, atol=1e-12
    )
    rows = rows.copy()
    rows[40] *= 200  # one example of s1 with 200x the norm: s1's gradient is mostly it
    tokens = tokens.copy()
    srcs = np.array(sk.sources)
    bank = np.stack([weighted_mean(rows[srcs == n], tokens[srcs == n]) for n in names])
    dots, norms = dots_to_rows(rows, bank)
    big = ExampleSketches(
        sources=sk.sources,
        ids=sk.ids,
        tokens=tokens,
        dots=dots,
        norms=norms,
        bank_names=names,
        bank_norms=np.linalg.norm(bank, axis=1),
        rows=sk.rows,
    )
    table = big.table()
    assert table.loc[40, "dominant"] and table["dominant"].sum() == 1
    assert table.loc[40, "self_share"] > 0.9
