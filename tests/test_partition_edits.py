"""Partition edits (move, drop, downweight, add) and the registry of partition methods."""

from __future__ import annotations

import numpy as np
import pytest

from merit_lab.analysis.conflict import compute_conflict_space
from merit_lab.partition.methods import PARTITION_METHODS, make_partition
from merit_lab.partition.plan import Partition


@pytest.fixture
def part() -> Partition:
    return Partition(
        method="balanced",
        groups=(("a", "b"), ("c", "d", "e")),
        examples={"a": 10, "b": 20, "c": 30, "d": 40, "e": 50},
        tokens={"a": 100, "b": 200, "c": 300, "d": 400, "e": 500},
    )


def test_drop_removes_the_source_everywhere_and_renormalises(part):
    p = part.drop("d", who="me")
    assert p.groups == (("a", "b"), ("c", "e"))
    assert p.dropped == ("d",) and "d" not in p.tokens and "d" not in p.examples
    assert p.weights == pytest.approx((300 / 1100, 800 / 1100))
    assert p.edit_log[-1]["op"] == "drop" and p.edit_log[-1]["who"] == "me"
    assert part.dropped == ()  # the original is untouched


def test_drop_refuses_to_empty_a_group_and_unknown_sources(part):
    p = part.drop("a")
    with pytest.raises(ValueError, match="empty group 0"):
        p.drop("b")
    with pytest.raises(ValueError, match="not in this partition"):
        part.drop("zzz")


def test_downweight_replaces_the_counts_and_records_the_fraction(part):
    p = part.downweight("c", 0.5, examples=15, tokens=140)
    assert p.fractions == {"c": 0.5}
    assert p.tokens["c"] == 140 and p.examples["c"] == 15
    assert p.group_tokens == (300, 140 + 400 + 500)
    back = p.downweight("c", 1.0, examples=30, tokens=300)
    assert back.fractions == {} and back.tokens == part.tokens
    for bad in (0, -0.1, 1.5, True):
        with pytest.raises(ValueError, match="fraction"):
            part.downweight("c", bad, examples=1, tokens=1)
    with pytest.raises(ValueError, match="already trains"):
        p.downweight("c", 0.5, examples=15, tokens=140)


def test_add_brings_back_a_dropped_source(part):
    p = part.drop("e").add("e", 0, examples=50, tokens=500)
    assert p.groups == (("a", "b", "e"), ("c", "d")) and p.dropped == ()
    with pytest.raises(ValueError, match="already in group"):
        p.add("a", 1, examples=1, tokens=1)
    with pytest.raises(ValueError, match="does not exist"):
        part.add("f", 2, examples=1, tokens=1)


def test_round_trip_keeps_curation(part, tmp_path):
    p = part.drop("d").downweight("c", 0.25, examples=8, tokens=75).move("a", 1)
    q = Partition.load(p.save(tmp_path / "partition.json"))
    assert q == p
    assert [e["op"] for e in q.edit_log] == ["drop", "downweight", "move"]


def test_old_documents_without_curation_fields_load(part):
    d = part.to_dict()
    del d["dropped"], d["fractions"]
    assert Partition.from_dict(d) == part


def test_invalid_curation_fields_are_refused(part):
    with pytest.raises(ValueError, match="both dropped and in a group"):
        Partition("m", part.groups, part.examples, part.tokens, dropped=("a",))
    with pytest.raises(ValueError, match="in no group"):
        Partition("m", part.groups, part.examples, part.tokens, fractions={"x": 0.5})


def test_registry_dispatch_equals_the_direct_calls():
    rng = np.random.default_rng(0)
    names = [f"s{i}" for i in range(8)]
    space = compute_conflict_space(rng.normal(size=(8, 64)), names)
    ex = {n: 10 + i for i, n in enumerate(names)}
    tok = {n: 100 + i for i, n in enumerate(names)}
    assert set(PARTITION_METHODS) >= {"balanced", "random", "kmeans"}
    a = make_partition(space, ex, tok, method="balanced", r=2)
    b = make_partition(space, ex, tok, method="balanced", k=4)
    assert a.groups == b.groups and a.k == 4
    with pytest.raises(ValueError, match="unknown partition method"):
        make_partition(space, ex, tok, method="spectral", k=2)
    # extra counts (e.g. a dropped source's) are ignored, only the space's sources are split
    c = make_partition(space, {**ex, "gone": 5}, {**tok, "gone": 5}, method="random", k=2)
    assert "gone" not in c.sources and len(c.sources) == 8
