"""Tests for merit_lab.analysis.conflict: cosine PCA against scikit-learn, invariances, errors,
JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from merit_lab.analysis import conflict
from merit_lab.analysis.conflict import ConflictSpace, compute_conflict_space
from merit_lab.envelope import EnvelopeError


def _rows(t: int = 12, d: int = 500, seed: int = 0) -> np.ndarray:
    """(t, d) float32 rows with a shared component and very different norms."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, d)) + 0.5 * rng.standard_normal(d)
    return (x * rng.uniform(0.01, 100.0, size=(t, 1))).astype(np.float32)


def _names(t: int) -> list[str]:
    return [f"src{i:02d}" for i in range(t)]


@pytest.mark.parametrize(
    ("dtype", "atol"),
    # float32 banks take float32 products (2× faster): cosines ~1e-7 off, which the minor axes
    # (close eigenvalues) amplify by 1/gap; float64 rows are exact to round-off.
    [(np.float64, 1e-8), (np.float32, 2e-5)],
    ids=["float64", "float32"],
)
def test_embedding_matches_sklearn_pca_of_unit_rows(dtype, atol):
    x = _rows().astype(dtype)
    space = compute_conflict_space(x, _names(12))
    unit = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    pca = PCA().fit(unit)
    ref = pca.transform(unit)
    assert space.n_axes == 11  # centring removes one direction
    for j in range(space.n_axes):
        sign = np.sign(ref[:, j] @ space.embedding[:, j])
        np.testing.assert_allclose(space.embedding[:, j], sign * ref[:, j], atol=atol)
    np.testing.assert_allclose(
        space.explained_variance_ratio[:11], pca.explained_variance_ratio_[:11], atol=atol / 100
    )
    np.testing.assert_allclose(
        space.eigenvalues[:11], pca.explained_variance_[:11] * 11, rtol=atol, atol=atol / 100
    )
    assert space.eigenvalues[11] == 0.0
    assert np.all(space.embedding[:, 11] == 0.0)
    assert space.explained_variance_ratio.sum() == pytest.approx(1.0)
    assert np.all(np.diff(space.eigenvalues) <= 0)


def test_cosine_matches_direct_computation():
    x = _rows(seed=1).astype(np.float64)
    space = compute_conflict_space(x, _names(12))
    n = np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(space.cosine, (x @ x.T) / np.outer(n, n), atol=1e-12)
    assert np.all(np.diag(space.cosine) == 1.0)
    assert np.array_equal(space.cosine, space.cosine.T)


def test_sign_convention_largest_entry_positive():
    space = compute_conflict_space(_rows(seed=2), _names(12))
    for j in range(space.n_axes):
        col = space.embedding[:, j]
        assert col[np.argmax(np.abs(col))] > 0


def test_scale_invariance_and_input_types(monkeypatch):
    x = _rows(seed=3)
    names = _names(12)
    base = compute_conflict_space(x, names)
    base64 = compute_conflict_space(x.astype(np.float64), names)
    scaled = compute_conflict_space(x * np.linspace(1e-3, 1e3, 12)[:, None], names)
    from_torch = compute_conflict_space(torch.from_numpy(x), names)
    monkeypatch.setattr(conflict, "_COL_CHUNK", 7)  # the Gram matrix is built in column blocks
    chunked = compute_conflict_space(x, names)
    for other in (scaled, from_torch, chunked, base64):
        np.testing.assert_allclose(other.cosine, base.cosine, atol=1e-6)
        np.testing.assert_allclose(other.embedding, base.embedding, atol=5e-5)  # see above
        assert other.order == base.order
    np.testing.assert_array_equal(from_torch.cosine, base.cosine)  # same float32 products
    # In float64 the chunking changes nothing but the order of the sums.
    chunked64 = compute_conflict_space(x.astype(np.float64), names)
    np.testing.assert_allclose(chunked64.cosine, base64.cosine, atol=1e-14)


@pytest.mark.parametrize("optimal", [True, False], ids=["optimal-order", "plain-order"])
def test_planted_clusters_are_contiguous_in_order_and_split_by_axis_one(optimal, monkeypatch):
    if not optimal:  # what a large T gets: the linkage's own leaf order
        monkeypatch.setattr(conflict, "_OPTIMAL_ORDER_MAX", 3)
    rng = np.random.default_rng(4)
    a = rng.standard_normal(400)
    signs = np.array([1, -1] * 5)  # interleaved so the order has work to do
    x = signs[:, None] * a + 0.3 * rng.standard_normal((10, 400))
    space = compute_conflict_space(x, _names(10))
    in_order = signs[list(space.order)]
    assert sorted(space.order) == list(range(10))
    assert np.count_nonzero(np.diff(in_order)) == 1
    first = space.coords(1)[:, 0]
    assert np.all(np.sign(first) == signs) or np.all(np.sign(first) == -signs)
    assert space.explained_variance_ratio[0] > 0.8


def test_two_sources():
    x = np.array([[1.0, 0.0], [1.0, 1.0]])
    space = compute_conflict_space(x, ["a", "b"])
    c = 1 / np.sqrt(2)
    assert space.cosine[0, 1] == pytest.approx(c)
    # Two unit vectors at distance sqrt(2 - 2c): scores ±half of it on the single axis.
    half = np.sqrt(2 - 2 * c) / 2
    np.testing.assert_allclose(np.abs(space.embedding[:, 0]), [half, half], atol=1e-12)
    assert space.n_axes == 1
    assert space.order == (0, 1)
    np.testing.assert_allclose(space.explained_variance_ratio, [1.0, 0.0])


def test_json_round_trip_is_exact(tmp_path):
    space = compute_conflict_space(_rows(seed=5), _names(12))
    path = space.save(tmp_path / "run" / "conflict.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == "merit-lab/conflict" and doc["names"] == _names(12)
    loaded = ConflictSpace.load(path)
    assert loaded.names == space.names and loaded.order == space.order
    for field in ("cosine", "eigenvalues", "embedding", "explained_variance_ratio"):
        assert np.array_equal(getattr(loaded, field), getattr(space, field))
    (tmp_path / "bad.json").write_text(json.dumps({**doc, "format": "other"}))
    with pytest.raises(ValueError, match="bad.json"):
        ConflictSpace.load(tmp_path / "bad.json")


def test_arrays_are_read_only_and_coords_checked():
    space = compute_conflict_space(_rows(seed=6), _names(12))
    with pytest.raises(ValueError):
        space.embedding[0, 0] = 1.0
    assert space.coords(3).shape == (12, 3)
    assert space.index("src03") == 3
    with pytest.raises(ValueError, match="r must be"):
        space.coords(13)
    with pytest.raises(ValueError, match="unknown source"):
        space.index("nope")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda x, n: (np.where(np.arange(12)[:, None] == 4, 0.0, x), n), "zero gradient.*src04"),
        (lambda x, n: (np.where(np.arange(12)[:, None] == 7, np.nan, x), n), "non-finite.*src07"),
        (lambda x, n: (x[:1], n[:1]), "at least 2"),
        (lambda x, n: (x, [*n[:-1], n[0]]), "duplicate.*src00"),
        (lambda x, n: (x, n[:-1]), "12 rows but 11 names"),
        (lambda x, n: (x[0], n), r"\(T, d\)"),
    ],
)
def test_errors(mutate, match):
    x, names = mutate(_rows(seed=7), _names(12))
    with pytest.raises(ValueError, match=match):
        compute_conflict_space(x, names)


def test_conflict_json_is_enveloped_and_a_foreign_or_newer_one_refused(tmp_path):
    """conflict.json carried the header from the start: the envelope keeps it, refuses another
    format or a newer version naming the file, and (no legacy) a document without a header."""
    space = compute_conflict_space(_rows(seed=8), _names(12))
    path = space.save(tmp_path / "conflict.json")
    doc = json.loads(path.read_text())
    assert list(doc)[:2] == ["format", "version"]
    assert (doc["format"], doc["version"]) == ("merit-lab/conflict", 2)
    assert "cosine" not in doc and space.to_dict()["version"] == 1  # arrays: conflict.safetensors
    cases = [
        ({**doc, "version": 3}, "conflict.json: merit-lab/conflict version 3 is not one"),
        ({**doc, "format": "merit-lab/partition"}, "holds 'merit-lab/partition', not 'merit-lab/c"),
        ({k: v for k, v in doc.items() if k not in ("format", "version")}, "holds None"),
    ]
    for bad, match in cases:
        path.write_text(json.dumps(bad))
        with pytest.raises(EnvelopeError, match=match):
            ConflictSpace.load(path)
        with pytest.raises(EnvelopeError, match=match.removeprefix("conflict.json: ")):
            ConflictSpace.from_dict(bad)
    path.write_text(json.dumps({**doc, "bank_key": "abc"}))  # the stage adds its key beside
    assert ConflictSpace.load(path).names == space.names
