"""Hand edits without widgets: `EditSession` against numbers worked out by hand or with numpy."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from merit_lab.analysis.conflict import compute_conflict_space
from merit_lab.io import read_json
from merit_lab.partition.gain import predict_gain
from merit_lab.partition.plan import Partition
from merit_lab.partition.session import (
    EditSession,
    fraction_subset,
    group_statistics,
    place_by_projection,
    subset_counts,
    within_between,
)

# Per-example train tokens. a, b, d: 10 examples each (100, 200, 400 tokens); c: 20 examples of
# uneven length (the down-weight case); e: a source in the space that no group holds yet.
C_TOKENS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]
TOKENS = {"a": [10] * 10, "b": [20] * 10, "c": C_TOKENS, "d": [40] * 10, "e": [5] * 4}
SEED = 7


def basis(i: int, d: int = 6) -> np.ndarray:
    return np.eye(d)[i]


@pytest.fixture
def tiny():
    """a, b point along e0 and c, d along e1 (groups G0 = {a, b}, G1 = {c, d}); e ≈ e0."""
    rows = np.stack(
        [
            basis(0),
            basis(0) + 0.2 * basis(2),
            basis(1),
            basis(1) + 0.2 * basis(3),
            basis(0) + 0.1 * basis(4),
        ]
    )
    names = ["a", "b", "c", "d", "e"]
    space = compute_conflict_space(rows, names)
    part = Partition(
        "manual",
        (("a", "b"), ("c", "d")),
        examples={s: len(TOKENS[s]) for s in "abcd"},
        tokens={s: sum(TOKENS[s]) for s in "abcd"},
    )
    session = EditSession(part, space, example_tokens=TOKENS, seed=SEED, rows=rows, user="ann")
    return SimpleNamespace(rows=rows, names=names, space=space, part=part, session=session)


def assert_refused(session: EditSession, edit, *args, **kwargs) -> None:
    """The edit raises ValueError and leaves the partition and the undo stack as they were."""
    before, depth = session.partition, len(session.history)
    with pytest.raises(ValueError):
        edit(*args, **kwargs)
    assert session.partition is before and len(session.history) == depth


def test_drop_leaves_every_group_and_renormalises_weights(tiny):
    s = tiny.session
    assert s.partition.weights == pytest.approx((300 / 797, 497 / 797))  # c sums to 97
    msg = s.drop("b")
    assert msg == "dropped b from G0"
    assert s.partition.groups == (("a",), ("c", "d")) and s.dropped == ("b",)
    assert "b" not in s.partition.tokens and "b" not in s.partition.examples
    # w_k = N_k / ΣN over what still trains: 100 against 97 + 400.
    assert s.partition.weights == pytest.approx((100 / 597, 497 / 597))
    entry = s.partition.edit_log[-1]
    assert (entry["op"], entry["source"], entry["from"], entry["who"]) == ("drop", "b", 0, "ann")
    stats = s.stats()
    assert stats["tokens"].tolist() == [100, 497]
    assert stats["weight"].sum() == pytest.approx(1.0)


def test_downweight_trains_a_seeded_subset_with_exact_tokens(tiny):
    s = tiny.session
    msg = s.downweight("c", 0.3)
    idx = fraction_subset("c", 20, 0.3, SEED)
    assert idx.size == round(0.3 * 20) == 6 and np.all(np.diff(idx) > 0)
    expect_tokens = int(sum(C_TOKENS[i] for i in idx))  # summed here, not by the library
    assert s.partition.examples["c"] == 6 and s.partition.tokens["c"] == expect_tokens
    assert subset_counts("c", C_TOKENS, 0.3, SEED) == (6, expect_tokens)
    assert s.partition.fractions == {"c": 0.3}
    assert msg == f"down-weighted c to 0.3: 97 → {expect_tokens} tokens, 6 examples"
    assert s.partition.weights[1] == pytest.approx((expect_tokens + 400) / (expect_tokens + 700))
    # Smaller fractions keep subsets of larger ones; the seed and the name pick the subset.
    assert set(fraction_subset("c", 20, 0.1, SEED)) <= set(idx)
    assert fraction_subset("c", 20, 0.01, SEED).size == 1  # never empty
    assert not np.array_equal(fraction_subset("c", 20, 0.5, SEED), fraction_subset("c", 20, 0.5, 8))
    # A fraction of 1 undoes it: full counts, no fraction recorded.
    s.downweight("c", 1.0)
    assert s.partition.fractions == {}
    assert (s.partition.examples["c"], s.partition.tokens["c"]) == (20, sum(C_TOKENS))
    assert [e["op"] for e in s.partition.edit_log] == ["downweight", "downweight"]
    assert (s.partition.edit_log[-1]["from"], s.partition.edit_log[-1]["to"]) == (0.3, 1.0)


def test_project_returns_own_rows_and_matches_sklearn():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(9, 30))
    space = compute_conflict_space(rows, [f"s{i}" for i in range(9)])
    for i in range(9):
        np.testing.assert_allclose(space.project(space.cosine[i]), space.embedding[i], atol=1e-9)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    new = rng.normal(size=30)
    u = new / np.linalg.norm(new)
    mine = space.project(unit @ u)
    pca = PCA(n_components=space.n_axes).fit(unit)
    signs = np.sign(np.sum(pca.transform(unit) * space.embedding[:, : space.n_axes], axis=0))
    np.testing.assert_allclose(mine[: space.n_axes], pca.transform(u[None])[0] * signs, atol=1e-9)
    assert np.all(mine[space.n_axes :] == 0)


def test_add_places_by_projection(tiny):
    s = tiny.session
    assert s.unplaced == ("e",)
    # e is e0 plus a little: it belongs with a and b.
    assert place_by_projection(tiny.space, s.partition, "e") == 0
    assert s.add("e") == "added e to G0 (projection)"
    assert s.partition.groups == (("a", "b", "e"), ("c", "d"))
    assert (s.partition.examples["e"], s.partition.tokens["e"]) == (4, 20)
    assert s.partition.edit_log[-1] | {"at": None} == {
        "op": "add",
        "source": "e",
        "to": 0,
        "who": "ann",
        "at": None,
    }
    s.undo()
    assert s.add("e", to_group=1) == "added e to G1 (by hand)"


def test_add_is_the_nearest_centroid_of_unit_gradients():
    """Twelve sources around three directions, grouped by family; two new ones join the group
    whose centroid of unit gradients is nearest (numpy, in the full gradient space)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 40))
    rows = np.stack([centres[i % 3] + 0.6 * rng.normal(size=40) for i in range(12)])
    rows = np.vstack([rows, centres[2] + 0.1, centres[0] + 0.8 * rng.normal(size=40)])
    names = [f"s{i:02d}" for i in range(12)] + ["new_c", "new_a"]
    space = compute_conflict_space(rows, names)
    groups = tuple(tuple(names[i] for i in range(12) if i % 3 == f) for f in range(3))
    tokens = {n: [10] * (5 + i) for i, n in enumerate(names)}
    part = Partition(
        "manual",
        groups,
        {n: len(tokens[n]) for n in names[:12]},
        {n: sum(tokens[n]) for n in names[:12]},
    )
    session = EditSession(part, space, example_tokens=tokens)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    centroids = np.stack([unit[[names.index(n) for n in g]].mean(axis=0) for g in groups])
    for new, family in (("new_c", 2), ("new_a", 0)):
        nearest = int(np.argmin(((centroids - unit[names.index(new)]) ** 2).sum(axis=1)))
        assert nearest == family
        session.add(new)
        assert session.partition.group_of(new) == family
    assert session.validate() == []


def test_undo_restores_each_partition(tiny):
    s = tiny.session
    p0 = s.partition
    s.drop("b")
    p1 = s.partition
    s.downweight("d", 0.5)
    s.move("c", 0)
    assert s.partition.groups == (("a", "c"), ("d",))
    assert s.undo() == "undone" and s.partition is not p1
    s.undo()
    assert s.partition is p1
    s.undo()
    assert s.partition is p0 and s.history == []
    with pytest.raises(ValueError, match="nothing to undo"):
        s.undo()


def test_refusals_change_nothing(tiny):
    s = tiny.session
    s.drop("b")  # G0 is {a} now
    assert_refused(s, s.drop, "a")  # would empty G0
    assert_refused(s, s.move, "a", 1)
    assert_refused(s, s.move_sources, ["a", "d"], 1)  # a would empty G0 (d is already in G1)
    assert_refused(s, s.move_sources, ["c", "d"], 1)  # nothing to move
    for unknown in (s.drop, s.add):
        assert_refused(s, unknown, "zzz")
    assert_refused(s, s.move, "zzz", 0)
    assert_refused(s, s.downweight, "zzz", 0.5)
    assert_refused(s, s.drop, "b")  # already dropped
    for bad in (0, 1.5, -0.1, math.nan):
        assert_refused(s, s.downweight, "c", bad)
    assert_refused(s, s.downweight, "c", 1.0)  # already trains all of it
    assert_refused(s, s.move, "c", 2)  # no group 2
    assert_refused(s, s.add, "e", 5)
    assert_refused(s, s.add, "c")  # already placed
    assert_refused(s, s.split, "balanced", k=4)  # K = 4 > 3 placed sources
    assert_refused(s, s.split, "no-such-method", r=1)
    assert [e["op"] for e in s.partition.edit_log] == ["drop"]


def test_move_sources_is_one_undo_step(tiny):
    s = tiny.session
    s.add("e")  # G0 = {a, b, e}
    depth = len(s.history)
    msg = s.move_sources(["a", "b", "d"], 1)  # d is already in G1: skipped
    assert msg == "moved 2 source(s) to G1: a, b"
    assert s.partition.groups == (("e",), ("c", "d", "a", "b"))
    assert len(s.history) == depth + 1
    assert [e["op"] for e in s.partition.edit_log] == ["add", "move", "move"]
    s.undo()
    assert s.partition.groups == (("a", "b", "e"), ("c", "d"))


def test_validate_blocks_save_until_every_source_is_settled(tiny, tmp_path):
    s = tiny.session
    path = tmp_path / "partition.json"
    assert s.validate() == ["sources neither placed nor dropped: ['e'] (add or drop them)"]
    with pytest.raises(ValueError, match="neither placed nor dropped"):
        s.save(path)
    assert not path.exists()
    s.drop("e")  # settling an unplaced source by dropping it
    assert s.dropped == ("e",) and s.validate() == [] and s.partition.groups == tiny.part.groups
    s.undo()
    s.add("e")
    assert s.validate() == []
    with pytest.raises(ValueError, match="no path"):
        s.save()


def test_save_and_load_keep_the_curation(tiny, tmp_path):
    s = tiny.session
    s.path = tmp_path / "partition.json"
    s.drop("b")
    s.downweight("c", 0.3)
    s.add("e")
    s.move("d", 0)
    out = s.save()
    doc = read_json(out)
    assert doc["dropped"] == ["b"] and doc["fractions"] == {"c": 0.3}
    assert [e["op"] for e in doc["edit_log"]] == ["drop", "downweight", "add", "move"]
    assert sum(doc["weights"]) == pytest.approx(1.0)
    loaded = Partition.load(out)
    assert loaded == s.partition
    assert loaded.dropped == ("b",) and dict(loaded.fractions) == {"c": 0.3}
    assert loaded.edit_log == s.partition.edit_log
    # a session on the saved file carries on from it
    again = EditSession(loaded, tiny.space, example_tokens=TOKENS, seed=SEED)
    assert again.unplaced == () and again.validate() == []
    again.downweight("c", 1.0)
    assert again.partition.tokens["c"] == sum(C_TOKENS)


def test_split_keeps_dropped_sources_and_fractions(tiny):
    s = tiny.session
    s.add("e")
    s.drop("b")
    s.downweight("c", 0.5)
    n_c = s.partition.tokens["c"]
    msg = s.split("balanced", k=2)
    assert msg == "split: balanced, K = 2"
    part = s.partition
    assert part.dropped == ("b",) and dict(part.fractions) == {"c": 0.5}
    assert part.tokens["c"] == n_c and "b" not in part.sources
    assert [e["op"] for e in part.edit_log] == ["add", "drop", "downweight", "split"]


def test_statistics_and_summary_by_hand(tiny):
    s = tiny.session
    c = tiny.space.cosine
    ia, ib, ic, id_ = (tiny.names.index(n) for n in "abcd")
    stats = group_statistics(s.partition, tiny.space, tiny.rows)  # e is in the space, ignored
    assert stats["cohesion"].tolist() == pytest.approx([c[ia, ib], c[ic, id_]])
    cross = [c[i, j] for i in (ia, ib) for j in (ic, id_)]
    assert stats["conflict"].tolist() == pytest.approx([np.mean(cross)] * 2)
    gain = predict_gain(s.partition, tiny.rows, tiny.names)
    assert stats["gain"].sum() == pytest.approx(gain, rel=1e-12)
    within, between = within_between(s.partition, tiny.space)
    assert within == pytest.approx((c[ia, ib] + c[ic, id_]) / 2)
    assert between == pytest.approx(np.mean(cross))
    assert s.summary() == pytest.approx({"within": within, "between": between, "gain": gain})
    assert s.stats().equals(stats)
