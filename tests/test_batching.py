"""The micro-batches of the gradient stage (`gradients.batching._runs`): the cheapest split of the
length-sorted examples, checked against every split there is (small cases) and by hand."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from merit_lab.gradients.batching import (
    CPU_CALL_TOKENS,
    _runs,
    call_price,
    fold_batches,
    fold_batching_cost,
    micro_batches,
    padded_calls,
)

Ex = dataclasses.make_dataclass("Ex", ["i", "n_tokens"])


def _every_split(lengths, size, tokens):
    """Every split of the longest-first order into consecutive runs that fit, as the runs'
    (count, padded-to) pairs: enumerated over all 2**(n-1) cut sets."""
    desc = sorted(lengths, reverse=True)
    n = len(desc)
    for cuts in itertools.product((False, True), repeat=n - 1):
        bounds = [0, *(k + 1 for k, c in enumerate(cuts) if c), n]
        runs = [(b - a, desc[a]) for a, b in itertools.pairwise(bounds)]
        fits = all(
            c == 1 or (c <= size if tokens is None else c * top <= tokens) for c, top in runs
        )
        if fits:
            yield runs


@pytest.mark.parametrize("call_tokens", [None, 0, 3, CPU_CALL_TOKENS, 1000])
@pytest.mark.parametrize("tokens", [None, 25])
def test_runs_are_the_cheapest_split(call_tokens, tokens):
    """On 300 random small sources the runs are a partition of the positions into consecutive
    runs of the longest-first order that fit, and no split there is costs less: fewest runs
    then fewest padded positions (``call_tokens`` None), else padded + call_tokens a run."""
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 9)
        lengths = [rng.randint(1, 12) for _ in range(n)]
        size = rng.randint(1, 4)
        runs = _runs(lengths, size, tokens, call_tokens)
        assert sorted(i for r in runs for i in r) == list(range(n))
        order = sorted(range(n), key=lambda i: -lengths[i])
        assert [i for r in runs for i in sorted(r, key=order.index)] == order
        got = [(len(r), max(lengths[i] for i in r)) for r in runs]
        for r in got:
            assert r[0] == 1 or (r[0] <= size if tokens is None else r[0] * r[1] <= tokens)

        def cost(split):
            pad = sum(c * top for c, top in split)
            return (len(split), pad) if call_tokens is None else call_tokens * len(split) + pad

        assert cost(got) == min(cost(s) for s in _every_split(lengths, size, tokens))


def test_a_batch_is_split_where_it_saves_more_padding_than_a_call():
    """Hand-worked, batches of at most 4: lengths 100, 10, 10, 10. The fewest batches: one,
    padded to 400. At a call's price of 20 tokens: 100 alone and 10, 10, 10 (100 + 30 padded
    + 2 calls = 170 against 400 + 20). At 300 a call, one batch again (700 against 730)."""
    ex = [Ex(i, n) for i, n in enumerate([10, 100, 10, 10])]
    ids = lambda batches: [[e.i for e in b] for b in batches]  # noqa: E731
    assert ids(micro_batches(ex, size=4)) == [[0, 1, 2, 3]]
    assert ids(micro_batches(ex, size=4, call_tokens=20)) == [[1], [0, 2, 3]]
    assert ids(micro_batches(ex, size=4, call_tokens=300)) == [[0, 1, 2, 3]]
    # equal lengths never pay for a call: one batch at any price
    same = [Ex(i, 7) for i in range(4)]
    assert ids(micro_batches(same, size=4, call_tokens=0)) == [[0, 1, 2, 3]]
    # each fold is batched at the price given (examples dealt: fold 0 = 0, 2; fold 1 = 1, 3)
    assert [ids(f) for f in fold_batches(ex, 2, size=4, call_tokens=20)] == [[[0, 2]], [[1], [3]]]
    assert [ids(f) for f in fold_batches(ex, 2, size=4)] == [[[0, 2]], [[1, 3]]]


def test_the_folds_batching_cost_is_counted_by_hand():
    """The same four examples (10, 100, 10, 10), batches of at most 4, 2 folds. At 20 a call:
    the folds run [0, 2], [1], [3] (3 calls, 20 + 100 + 10 = 130 padded), one fold [1],
    [0, 2, 3] (2 calls, 100 + 30). The fewest batches: [0, 2], [1, 3] (2 calls, 20 + 200)
    against one batch of 4 (400). The price is the CPU's alone."""
    ex = [Ex(i, n) for i, n in enumerate([10, 100, 10, 10])]
    assert padded_calls([[ex[0], ex[1]], [ex[2]]]) == (2, 200 + 10)
    assert fold_batching_cost(ex, 2, size=4, call_tokens=20) == {
        "folds": [3, 130],
        "one_fold": [2, 130],
    }
    assert fold_batching_cost(ex, 2, size=4) == {"folds": [2, 220], "one_fold": [1, 400]}
    assert call_price("cpu") == CPU_CALL_TOKENS
    assert call_price("cuda") is None and call_price("mps") is None


@pytest.mark.parametrize("price", [20, 100])
def test_bench_fold_deal_counts_the_padding_of_each_way_by_hand(price, monkeypatch):
    """`bench_fold_deal.padding` on one source of lengths 100 and seven 10s (batches of at most
    8, 4 folds), the same for every calibration order: without folds one batch padded to 800,
    priced (20 or 100 tokens a batch) 100 alone and seven 10s (170, 2 batches); dealt by example
    a fold holds 100 and a 10 (200) and three hold two 10s (60): 260; priced at 20 the 100 goes
    alone (110 + 2·20 < 200 + 20: 170 in 5 batches), at 100 it stays with its 10
    (110 + 2·100 > 200 + 100: 260 in 4); by whole batch there is one batch, fewer than 2 a
    fold, so examples are dealt: 260."""
    import numpy as np

    import benchmarks.bench_fold_deal as bench

    monkeypatch.setattr(bench, "CPU_CALL_TOKENS", price)
    pad = bench.padding(np.array([[100, 10, 10, 10, 10, 10, 10, 10]]), orders=3)
    priced = {20: (170, 5), 100: (260, 4)}[price]
    want = {"none": 800, "examples": 260, "batches": 260, "none_cpu": 170}
    want |= {"examples_cpu": priced[0], "calls_none_cpu": 2, "calls_examples_cpu": priced[1]}
    assert pad == {k: [v] * 3 for k, v in want.items()}
