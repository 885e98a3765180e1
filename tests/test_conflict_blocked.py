"""The conflict space out of core: the blocked Gram, the memory-mapped bank, the top-axes PCA,
each against the in-memory path and independent references (numpy, scipy, scikit-learn)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform
from sklearn.decomposition import PCA

from merit_lab.analysis import conflict
from merit_lab.analysis.conflict import ConflictSpace, compute_conflict_space, space_from_cosine
from merit_lab.gradients import bank as bank_mod
from merit_lab.gradients.bank import GradientBank, map_rows
from merit_lab.partition.methods import split_balanced_k


def _rows(t: int, d: int, seed: int = 0, rank: int = 0) -> np.ndarray:
    """(t, d) float32 rows, norms over four decades; ``rank`` > 0 plants that many strong,
    well-separated directions (so the top PCA axes are far apart)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, d))
    if rank:
        basis = rng.standard_normal((rank, d))
        x += (rng.standard_normal((t, rank)) * (4.0 * 0.6 ** np.arange(rank))) @ basis
    return (x * rng.uniform(0.01, 100.0, size=(t, 1))).astype(np.float32)


def _names(t: int) -> list[str]:
    return [f"s{i:03d}" for i in range(t)]


def _reference_cosine(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    n = np.linalg.norm(x, axis=1)
    return (x @ x.T) / np.outer(n, n)


def _narrow(monkeypatch, t: int, columns: int = 50, itemsize: int = 4) -> None:
    """Blocks of `columns` columns for T = t: the in-place (syrk) accumulation."""
    monkeypatch.setattr(conflict, "_BLOCK_BYTES", t * itemsize * columns)


@pytest.mark.parametrize(("dtype", "atol"), [(np.float32, 1e-6), (np.float64, 1e-13)])
def test_blocked_gram_matches_the_in_memory_path_and_numpy(monkeypatch, dtype, atol):
    x = _rows(40, 1000, seed=1, rank=4).astype(dtype)
    wide = compute_conflict_space(x, _names(40))
    _narrow(monkeypatch, 40, itemsize=np.dtype(dtype).itemsize)
    assert conflict._column_width(40, np.dtype(dtype).itemsize) == 50  # 20 blocks
    gram, bad = conflict._gram(x)
    assert gram.dtype == dtype and bad == []
    assert np.array_equal(gram, gram.T)  # the triangle mirrored exactly
    np.testing.assert_allclose(gram, x.astype(np.float64) @ x.T.astype(np.float64), rtol=atol * 10)
    blocked = compute_conflict_space(x, _names(40))
    np.testing.assert_allclose(blocked.cosine, _reference_cosine(x), atol=atol)
    np.testing.assert_allclose(blocked.cosine, wide.cosine, atol=atol)
    assert np.array_equal(blocked.cosine, blocked.cosine.T)
    assert np.all(np.diag(blocked.cosine) == 1.0)
    # the four planted axes are far apart: their scores agree to the cosines' rounding
    np.testing.assert_allclose(blocked.embedding[:, :4], wide.embedding[:, :4], atol=atol * 100)
    assert blocked.order == wide.order


def test_blocked_gram_reads_torch_rows_like_numpy(monkeypatch):
    x = _rows(30, 700, seed=2)
    _narrow(monkeypatch, 30)
    a = compute_conflict_space(x, _names(30))
    b = compute_conflict_space(torch.from_numpy(x), _names(30))
    np.testing.assert_array_equal(a.cosine, b.cosine)


def test_non_finite_rows_are_named_in_both_paths(monkeypatch):
    x = _rows(12, 300, seed=3)
    x[3, 17] = np.nan
    x[7, 250] = np.inf
    for narrow in (False, True):
        if narrow:
            _narrow(monkeypatch, 12, columns=40)
        with pytest.raises(
            ValueError, match=r"non-finite gradient for sources: \['s003', 's007'\]"
        ):
            compute_conflict_space(x, _names(12))


def test_mapped_bank_gives_the_same_space_as_the_bank_in_memory(tmp_path, monkeypatch):
    x = _rows(24, 512, seed=4)
    GradientBank(tuple(_names(24)), x).save(tmp_path)
    mapped = map_rows(tmp_path)
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, x)
    loaded = GradientBank.load(tmp_path, mmap=True)
    assert isinstance(loaded.rows, np.memmap)
    np.testing.assert_array_equal(loaded.rows, GradientBank.load(tmp_path).rows)
    for narrow in (False, True):
        if narrow:
            _narrow(monkeypatch, 24, columns=100)
        a = compute_conflict_space(x, _names(24))
        b = compute_conflict_space(mapped, _names(24))
        np.testing.assert_array_equal(a.cosine, b.cosine)  # same blocks, same products
        np.testing.assert_array_equal(a.embedding, b.embedding)
        # a row slice of the map is read from its own place in the file
        part = compute_conflict_space(mapped[5:20], _names(15))
        np.testing.assert_array_equal(
            part.cosine, compute_conflict_space(x[5:20], _names(15)).cosine
        )
    gram, _ = conflict._gram(mapped[3:11])
    np.testing.assert_allclose(
        gram, x[3:11].astype(np.float64) @ x[3:11].T.astype(np.float64), rtol=1e-5
    )


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_mapped_bank_stays_out_of_the_resident_set(tmp_path, monkeypatch):
    """A 64 MiB mapped bank read in 1 MiB blocks: read by pread, none of its pages enters the
    resident set (read through the mapping instead, they all do: the test can fail)."""
    t, d = 64, 2**18
    rng = np.random.default_rng(5)
    GradientBank(tuple(_names(t)), rng.standard_normal((t, d), dtype=np.float32)).save(tmp_path)
    monkeypatch.setattr(conflict, "_BLOCK_BYTES", 2**20)
    grown = {}
    for release in (True, False):
        if not release:
            monkeypatch.setattr(conflict._MappedRows, "open", lambda rows: None)
        rows = map_rows(tmp_path)
        before = _rss_file_kb()
        conflict._gram(rows)
        grown[release] = (_rss_file_kb() - before) / 1024
        del rows
    assert grown[False] > 48  # MiB: the whole bank stays mapped in
    assert grown[True] < 8


def test_top_axes_match_the_full_eigendecomposition_and_sklearn(monkeypatch):
    x = _rows(60, 400, seed=6, rank=5)
    names = _names(60)
    full = compute_conflict_space(x, names)
    monkeypatch.setattr(conflict, "_FULL_PCA_MAX", 10)  # T = 60 now takes the Lanczos path
    top = compute_conflict_space(x, names)
    r = conflict._TOP_AXES
    assert top.eigenvalues.shape == (r,) and top.embedding.shape == (60, r)
    np.testing.assert_allclose(top.eigenvalues, full.eigenvalues[:r], rtol=1e-10)
    np.testing.assert_allclose(
        top.explained_variance_ratio, full.explained_variance_ratio[:r], rtol=1e-10
    )
    np.testing.assert_allclose(top.embedding[:, :5], full.embedding[:, :5], atol=1e-10)
    np.testing.assert_array_equal(top.cosine, full.cosine)
    assert top.order == full.order
    unit = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    pca = PCA(n_components=5).fit(unit)
    ref = pca.transform(unit)
    for j in range(5):
        sign = np.sign(ref[:, j] @ top.embedding[:, j])
        np.testing.assert_allclose(top.embedding[:, j], sign * ref[:, j], atol=2e-5)
    np.testing.assert_allclose(
        top.explained_variance_ratio[:5], pca.explained_variance_ratio_, atol=1e-6
    )
    # a source projects onto its own (kept) coordinates; past the kept axes coords refuse
    np.testing.assert_allclose(top.project(top.cosine[7]), top.embedding[7], atol=1e-10)
    with pytest.raises(ValueError, match="keeps the top 16 axes"):
        top.coords(r + 1)
    # the MERIT split reads the top axes only: the same groups
    ex = {n: 100 + i for i, n in enumerate(names)}
    assert split_balanced_k(top, ex, ex, k=8).groups == split_balanced_k(full, ex, ex, k=8).groups


def test_axes_keeps_the_full_paths_first_columns_exactly():
    x = _rows(20, 300, seed=7)
    full = compute_conflict_space(x, _names(20))
    four = compute_conflict_space(x, _names(20), axes=4)
    np.testing.assert_array_equal(four.embedding, full.embedding[:, :4])
    np.testing.assert_array_equal(four.eigenvalues, full.eigenvalues[:4])
    # / trace(J C J) instead of / the sum of all eigenvalues: equal to rounding
    np.testing.assert_allclose(four.explained_variance_ratio, full.explained_variance_ratio[:4])
    assert compute_conflict_space(x, _names(20), axes=50).eigenvalues.shape == (20,)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="axes must be a positive integer"):
            space_from_cosine(full.cosine, full.names, axes=bad)


def test_space_with_kept_axes_round_trips_and_checks_shapes(tmp_path):
    space = compute_conflict_space(_rows(15, 200, seed=8), _names(15), axes=3)
    back = ConflictSpace.load(space.save(tmp_path / "conflict.json"))
    for field in ("cosine", "eigenvalues", "embedding", "explained_variance_ratio"):
        np.testing.assert_array_equal(getattr(back, field), getattr(space, field))
    arrays = (space.eigenvalues, space.embedding, space.explained_variance_ratio)
    with pytest.raises(ValueError, match="embedding has shape"):
        ConflictSpace(
            space.names, space.cosine, arrays[0], arrays[1][:, :2], arrays[2], space.order
        )
    with pytest.raises(ValueError, match="eigenvalues must be"):
        ConflictSpace(space.names, space.cosine, np.zeros(16), arrays[1], arrays[2], space.order)


def test_caller_arrays_are_never_frozen_or_aliased():
    c = _reference_cosine(_rows(10, 100, seed=9))
    space = space_from_cosine(c, _names(10))
    assert c.flags.writeable and not np.shares_memory(c, space.cosine)
    assert not space.cosine.flags.writeable


def test_in_place_helpers_equal_their_whole_matrix_forms():
    rng = np.random.default_rng(10)
    a = rng.standard_normal((37, 37))
    ref = (a + a.T) / 2
    conflict._symmetrize(a, strip=8)
    np.testing.assert_array_equal(a, ref)
    g = rng.standard_normal((37, 37)).astype(np.float32)
    lower = np.tril(g)
    conflict._mirror_lower(lower, strip=8)
    np.testing.assert_array_equal(lower, np.tril(g) + np.tril(g, -1).T)
    c = _reference_cosine(_rows(37, 90, seed=11))
    dist = np.clip(1.0 - c, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    z = linkage(squareform(dist, checks=False), method="average", optimal_ordering=True)
    assert conflict._cluster_order(c) == tuple(int(i) for i in leaves_list(z))


def test_bank_digest_and_finite_check_go_by_row_blocks(tmp_path, monkeypatch):
    x = _rows(9, 64, seed=12)
    monkeypatch.setattr(bank_mod, "_CHECK_ROWS_BYTES", 2 * 64 * 4)  # two rows a block
    assert bank_mod._row_blocks(x) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]
    assert bank_mod._rows_digest(x) == hashlib.sha256(x.tobytes()).hexdigest()
    x[8, 3] = np.nan  # in the last, short block
    GradientBank(tuple(_names(9)), x).save(tmp_path)
    for mmap in (False, True):
        with pytest.raises(ValueError, match=r"non-finite values in the rows of \['s008'\]"):
            GradientBank.load(tmp_path, mmap=mmap)


def test_map_rows_refuses_what_it_cannot_map(tmp_path):
    wide = tmp_path / "f64"
    wide.mkdir()
    save_file({"rows": torch.zeros(3, 4, dtype=torch.float64)}, wide / "bank.safetensors")
    with pytest.raises(ValueError, match="not a 2-D float32 tensor"):
        map_rows(wide)
    cut = tmp_path / "cut"
    cut.mkdir()
    save_file({"rows": torch.ones(3, 4)}, cut / "bank.safetensors")
    data = (cut / "bank.safetensors").read_bytes()
    (cut / "bank.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="cut short"):
        map_rows(cut)
