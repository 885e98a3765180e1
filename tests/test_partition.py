"""Tests for merit_lab.partition.plan: balance, planted-structure recovery, baselines, edits,
gain."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from merit_lab.analysis.conflict import ConflictSpace, compute_conflict_space
from merit_lab.envelope import EnvelopeError
from merit_lab.partition.gain import predict_gain
from merit_lab.partition.methods import split_balanced, split_balanced_k, split_kmeans, split_random
from merit_lab.partition.plan import Partition


def _names(t: int) -> list[str]:
    return [f"s{i:02d}" for i in range(t)]


def _planted(seed: int = 0):
    """24 sources in 4 clusters around ±a ± 0.6b (a ⟂ b), 6 per cluster.

    Every cluster carries the same multiset of example counts, so the sample-weighted median
    on each axis falls exactly between clusters.
    """
    rng = np.random.default_rng(seed)
    d = 256
    q, _ = np.linalg.qr(rng.standard_normal((d, 2)))
    a, b = q[:, 0], q[:, 1]
    sa = np.repeat([1, 1, -1, -1], 6)
    sb = np.repeat([1, -1, 1, -1], 6)
    perm = rng.permutation(24)  # interleave the clusters in the source order
    sa, sb = sa[perm], sb[perm]
    noise = rng.standard_normal((24, d)) * (0.25 / np.sqrt(d))
    rows = sa[:, None] * a + 0.6 * sb[:, None] * b + noise
    rows *= rng.uniform(0.5, 2.0, size=(24, 1))  # norms must not matter
    names = _names(24)
    sizes = [10, 20, 35, 50, 80, 120]
    examples, tokens = {}, {}
    for cluster in range(4):
        members = [
            i for i in range(24) if (sa[i], sb[i]) == [(1, 1), (1, -1), (-1, 1), (-1, -1)][cluster]
        ]
        for i, n in zip(members, rng.permutation(sizes), strict=True):
            examples[names[i]] = int(n)
            tokens[names[i]] = int(n) * 37  # the same example length: both balances agree
    return rows, names, examples, tokens, sa, sb


def _random_instance(seed: int, t: int = 40):
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((t, 64))
    names = _names(t)
    ex = {
        s: int(v) for s, v in zip(names, rng.lognormal(4, 1, size=t).astype(int) + 1, strict=True)
    }
    tok = {s: ex[s] * int(rng.integers(10, 100)) for s in names}
    return compute_conflict_space(rows, names), ex, tok


def _space_from_coords(coords: np.ndarray) -> ConflictSpace:
    """A ConflictSpace whose embedding is the given (T, r) coordinates (cosine unused)."""
    t, r = coords.shape
    emb = np.zeros((t, t))
    emb[:, :r] = coords
    ev = np.zeros(t)
    ev[:r] = np.arange(r, 0, -1)
    return ConflictSpace(_names(t), np.eye(t), ev, emb, ev / ev.sum(), tuple(range(t)))


def _check_share(part: Partition, tokens) -> None:
    """Each group within one source's size of 1/K of the tokens (the split's size unit)."""
    total = sum(tokens.values())
    max_share = max(tokens.values()) / total
    shares = np.array(part.group_tokens) / total
    assert np.all(np.abs(shares - 1 / part.k) <= max_share), (shares, max_share)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_example_shares(seed):
    space, ex, tok = _random_instance(seed)
    for r in (1, 2, 3):
        part = split_balanced(space, ex, tok, r=r)
        assert part.k == 2**r and part.params["r"] == r
        _check_share(part, tok)
    for k in (3, 5, 6):
        part = split_balanced_k(space, ex, tok, k=k)
        assert part.k == k
        _check_share(part, tok)
    for k in (2, 3, 4, 5, 6, 8):
        _check_share(split_random(space.names, ex, tok, k=k, seed=seed), tok)


def test_every_source_lands_in_exactly_one_group():
    space, ex, tok = _random_instance(3)
    part = split_balanced_k(space, ex, tok, k=7)
    assert sorted(part.sources) == sorted(space.names)
    assert all(len(g) >= 1 for g in part.groups)
    np.testing.assert_array_equal(part.labels(space.names), [part.group_of(s) for s in space.names])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_recovers_planted_two_axis_structure(seed):
    rows, names, ex, tok, sa, sb = _planted(seed)
    space = compute_conflict_space(rows, names)
    p1 = split_balanced(space, ex, tok, r=1)
    assert adjusted_rand_score(sa, p1.labels(names)) == 1.0
    p2 = split_balanced(space, ex, tok, r=2)
    assert adjusted_rand_score(2 * sa + sb, p2.labels(names)) == 1.0
    assert p2.group_examples == (315,) * 4  # sum(sizes): each cluster exactly
    assert p2.group_tokens == (315 * 37,) * 4
    # Depth-first, low side first: groups 0-1 share the axis-0 side, as do 2-3.
    l1, l2 = p1.labels(names), p2.labels(names)
    np.testing.assert_array_equal(l2 // 2, l1)
    km = split_kmeans(space, ex, tok, k=4, seed=seed)
    assert adjusted_rand_score(2 * sa + sb, km.labels(names)) == 1.0


def test_cut_is_the_token_weighted_median():
    space = _space_from_coords(np.array([[-2.0], [-1.0], [0.0], [1.0], [2.0]]))
    ones = dict.fromkeys(space.names, 1)

    def groups(tokens):
        return split_balanced(space, ones, tokens, r=1).groups

    assert groups({**ones, "s00": 100}) == (("s00",), ("s01", "s02", "s03", "s04"))
    assert groups({**ones, "s04": 100}) == (("s00", "s01", "s02", "s03"), ("s04",))
    assert groups({**ones, "s01": 3}) == (("s00", "s01"), ("s02", "s03", "s04"))
    # A tie between two cuts goes to the lower one: deterministic.
    assert groups(ones) == (("s00", "s01"), ("s02", "s03", "s04"))


def test_k3_splits_one_third_then_the_next_axis():
    coords = np.array([[-3, 1], [-2, -1], [-1, 5], [1, -5], [2, 2], [3, -2]], dtype=float)
    space = _space_from_coords(coords)
    ones = dict.fromkeys(space.names, 1)
    part = split_balanced_k(space, ones, ones, k=3)
    assert part.groups == (("s00", "s01"), ("s03", "s05"), ("s02", "s04"))
    assert part.params == {"k": 3, "axes": [0, 1]}


def test_weights_are_token_shares():
    space, ex, tok = _random_instance(4)
    part = split_balanced(space, ex, tok, r=2)
    total = sum(tok.values())
    assert sum(part.weights) == pytest.approx(1.0, abs=1e-12)
    for g, w, n in zip(part.groups, part.weights, part.group_tokens, strict=True):
        assert n == sum(tok[s] for s in g)
        assert w == pytest.approx(n / total)


def test_json_round_trip(tmp_path):
    space, ex, tok = _random_instance(5)
    part = split_balanced(space, ex, tok, r=2).move("s03", 0, who="alice")
    if part.group_of("s03") != 0:
        raise AssertionError("move did not move")
    path = part.save(tmp_path / "partition.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == "merit-lab/partition" and doc["k"] == 4
    assert doc["weights"] == list(part.weights)
    loaded = Partition.load(path)
    assert loaded == part
    assert loaded.to_dict() == part.to_dict()


def test_partition_json_is_enveloped_and_a_foreign_or_newer_one_refused(tmp_path):
    """partition.json carried the header from the start: kept, with another format, a newer
    version and (no legacy) a header-less document refused, naming the file."""
    space, ex, tok = _random_instance(6)
    part = split_balanced(space, ex, tok, r=1)
    path = part.save(tmp_path / "partition.json")
    doc = json.loads(path.read_text())
    assert list(doc)[:2] == ["format", "version"]
    assert (doc["format"], doc["version"]) == ("merit-lab/partition", 1)
    cases = [
        ({**doc, "version": 2}, "partition.json: merit-lab/partition version 2 is not one"),
        ({**doc, "format": "merit-lab/conflict"}, "holds 'merit-lab/conflict', not 'merit-lab/p"),
        ({k: v for k, v in doc.items() if k not in ("format", "version")}, "holds None"),
    ]
    for bad, match in cases:
        path.write_text(json.dumps(bad))
        with pytest.raises(EnvelopeError, match=match):
            Partition.load(path)
        with pytest.raises(EnvelopeError, match=match.removeprefix("partition.json: ")):
            Partition.from_dict(bad)
    path.write_text(json.dumps({k: v for k, v in doc.items() if k != "groups"}))
    with pytest.raises(ValueError, match="partition.json: missing field 'groups'"):
        Partition.load(path)


def test_move_logs_and_refuses_to_empty_a_group():
    space = _space_from_coords(np.array([[-1.0], [0.0], [1.0]]))
    ones = dict.fromkeys(space.names, 1)
    part = split_balanced(space, ones, {**ones, "s02": 2}, r=1)
    assert part.groups == (("s00", "s01"), ("s02",))
    moved = part.move("s01", 1)
    assert moved.groups == (("s00",), ("s02", "s01"))
    assert part.groups == (("s00", "s01"), ("s02",))  # the original is untouched
    (entry,) = moved.edit_log
    assert entry["op"] == "move" and (entry["from"], entry["to"]) == (0, 1)
    assert entry["source"] == "s01" and entry["who"] == "user"
    with pytest.raises(ValueError, match="empty group 0"):
        moved.move("s00", 1)
    with pytest.raises(ValueError, match="already in group"):
        moved.move("s00", 0)
    with pytest.raises(ValueError, match="does not exist"):
        moved.move("s02", 2)
    with pytest.raises(ValueError, match="not in this partition"):
        moved.move("zz", 0)


def test_random_and_kmeans_are_deterministic_by_seed():
    space, ex, tok = _random_instance(6)
    for split in (
        lambda s: split_random(space.names, ex, tok, k=4, seed=s),
        lambda s: split_kmeans(space, ex, tok, k=4, seed=s, r=5),
    ):
        assert split(0) == split(0)
        assert any(split(s).groups != split(0).groups for s in range(1, 6))
    counted = split_random(space.names, ex, tok, k=3, seed=0, balance="count")
    assert sorted(len(g) for g in counted.groups) == [13, 13, 14]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda sp, ex, tok: split_balanced_k(sp, ex, tok, k=41), "only 40 sources"),
        (lambda sp, ex, tok: split_balanced_k(sp, ex, tok, k=0), "positive integer"),
        (lambda sp, ex, tok: split_balanced(sp, ex, tok, r=40), "axes"),
        (lambda sp, ex, tok: split_balanced(sp, {**ex, "zz": 3}, tok, r=1), "unknown.*zz"),
        (lambda sp, ex, tok: split_balanced(sp, ex, {**tok, "zz": 3}, r=1), "unknown.*zz"),
        (
            lambda sp, ex, tok: split_balanced(
                sp, {k: v for k, v in ex.items() if k != "s05"}, tok, r=1
            ),
            "missing examples.*s05",
        ),
        (lambda sp, ex, tok: split_balanced(sp, {**ex, "s02": 0}, tok, r=1), "s02.*positive"),
        (lambda sp, ex, tok: split_balanced(sp, ex, {**tok, "s02": -4}, r=1), "s02.*positive"),
        (lambda sp, ex, tok: split_balanced(sp, {**ex, "s02": 2.5}, tok, r=1), "s02.*positive"),
        (lambda sp, ex, tok: split_random(sp.names, ex, tok, k=41, seed=0), "only 40"),
        (lambda sp, ex, tok: split_kmeans(sp, ex, tok, k=41, seed=0), "only 40"),
        (lambda sp, ex, tok: split_kmeans(sp, ex, tok, k=2, seed=0, r=40), "r must be"),
    ],
)
def test_errors(call, match):
    space, ex, tok = _random_instance(7)
    with pytest.raises(ValueError, match=match):
        call(space, ex, tok)


def test_partition_validates_itself():
    c = {"a": 1, "b": 1}
    with pytest.raises(ValueError, match="empty groups"):
        Partition("manual", (("a", "b"), ()), c, c, {})
    with pytest.raises(ValueError, match="more than one group"):
        Partition("manual", (("a",), ("a", "b")), c, c, {})
    with pytest.raises(ValueError, match="missing tokens"):
        Partition("manual", (("a",), ("b",)), c, {"a": 1}, {})


def test_predict_gain_two_groups_is_the_papers_formula():
    rng = np.random.default_rng(8)
    rows = rng.standard_normal((4, 50))
    names = ["a", "b", "c", "d"]
    tokens = {"a": 30, "b": 10, "c": 20, "d": 20}  # 40 tokens per group: w = (1/2, 1/2)
    part = Partition("manual", (("a", "b"), ("c", "d")), dict.fromkeys(names, 1), tokens, {})
    assert part.weights == (0.5, 0.5)
    g1 = (30 * rows[0] + 10 * rows[1]) / 40
    g2 = (20 * rows[2] + 20 * rows[3]) / 40
    eta = 0.3
    expected = eta**2 / 8 * float((g1 - g2) @ (g1 - g2))
    assert predict_gain(part, rows, names, eta=eta) == pytest.approx(expected, rel=1e-12)
    # Row order and the container do not matter; extra rows are ignored.
    shuffled = np.vstack([rows[[3, 1, 0, 2]], rng.standard_normal((1, 50))])
    got = predict_gain(part, torch.from_numpy(shuffled), ["d", "b", "a", "c", "x"], eta=eta)
    assert got == pytest.approx(expected, rel=1e-12)


def test_predict_gain_general_k():
    rng = np.random.default_rng(9)
    rows = rng.standard_normal((6, 20))
    names = _names(6)
    tok = {s: int(n) for s, n in zip(names, rng.integers(1, 100, size=6), strict=True)}
    part = Partition("manual", (("s00",), ("s01", "s02", "s03"), ("s04", "s05")), tok, tok, {})
    means = [
        sum(tok[s] * rows[names.index(s)] for s in g) / sum(tok[s] for s in g) for g in part.groups
    ]
    w = np.array(part.weights)
    gbar = sum(wk * m for wk, m in zip(w, means, strict=True))
    # Σ w_k ‖ḡ_k − ḡ‖² = Σ w_k ‖ḡ_k‖² − ‖ḡ‖²
    expected = 0.5 * (sum(wk * m @ m for wk, m in zip(w, means, strict=True)) - gbar @ gbar)
    assert predict_gain(part, rows, names) == pytest.approx(expected, rel=1e-10)
    assert predict_gain(part, rows, names, eta=2.0) == pytest.approx(4 * expected, rel=1e-10)
    one = Partition("manual", (tuple(names),), tok, tok, {})
    assert predict_gain(one, rows, names) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="no gradient row.*s05"):
        predict_gain(part, rows[:5], names[:5])


def test_balanced_split_beats_random_on_predicted_gain():
    rows, names, ex, tok, _, _ = _planted(1)
    space = compute_conflict_space(rows, names)
    gain = predict_gain(split_balanced(space, ex, tok, r=1), rows, names, normalize=True)
    for seed in range(5):
        rand = split_random(names, ex, tok, k=2, seed=seed)
        assert gain > 2 * predict_gain(rand, rows, names, normalize=True)


def test_the_balanced_cut_balances_tokens_not_examples():
    """Hand-worked: four sources on one axis, examples and tokens disagree about the median.

    Coordinates -3, -1, 1, 3; examples 1, 1, 1, 1 (example median: after the 2nd source);
    tokens 30, 10, 10, 10 (token median: after the 1st, 30 vs 30). The split balances tokens,
    the unit of its merge weights, so the weights come out 1/2 and 1/2.
    """
    space = _space_from_coords(np.array([[-3.0], [-1.0], [1.0], [3.0]]))
    names = space.names
    ex = dict.fromkeys(names, 1)
    tok = dict(zip(names, [30, 10, 10, 10], strict=True))
    part = split_balanced(space, ex, tok, r=1)
    assert part.groups == ((names[0],), tuple(names[1:]))
    assert part.group_tokens == (30, 30) and part.weights == (0.5, 0.5)
    assert part.group_examples == (1, 3)
    rnd = split_random(names, ex, tok, k=2, seed=0)
    assert sorted(rnd.group_tokens) == [30, 30]  # within one source's size of 1/2 (exactly here)
