"""How one source's calibration examples become folds and micro-batches.

Input: a source's tokenised calibration examples (anything with ``n_tokens``), in calibration
order. Output: its micro-batches (`micro_batches`), its folds (`deal_folds`), or the micro-batches
of each fold (`fold_batches`, what the gradient stage runs). None of this changes a gradient's
value, only its summation order; `fold_batches` decides which examples each fold row holds.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from merit_lab.config.fields import not_one_of, refuse
from merit_lab.config.schema import FOLD_DEALS, CalibrationConfig

__all__ = [
    "CPU_CALL_TOKENS",
    "call_price",
    "check_deal",
    "deal_folds",
    "fold_batches",
    "fold_batching",
    "fold_batching_cost",
    "micro_batches",
    "padded_calls",
]


def check_deal(deal: str) -> None:
    """The config's own refusal of an unknown ``calibration.fold_deal``."""
    refuse(not_one_of("fold_deal", "deal", deal, FOLD_DEALS))


# What one forward/backward costs beyond its padded tokens, in padded tokens, on the CPU: each
# call dispatches every op once and writes a fresh gradient of every parameter, added into
# .grad. Fits of seconds = fixed + per padded token (`benchmarks/bench_call_price.py`, freed
# memory kept, 2 cores, 2026-12-07): 176-224 tokens on the demo base (0.65M parameters), 92-99
# on a Llama shape of 11M, 83 on one of 41M, 50-54 on SmolLM2-135M. Applied to the stage's own
# batches the fits put 100 within 2% of the best price, with folds and without, on the demo and
# on SmolLM2 (`docs/performance.md`, the price re-tuned), so one price serves them all.
CPU_CALL_TOKENS = 100


def call_price(device_type: str) -> int | None:
    """The price of a micro-batch in padded tokens on a device of this type (``"cpu"``,
    ``"cuda"``, ...): `CPU_CALL_TOKENS` on the CPU, where a batch is split off wherever that
    saves more padding than a call costs; None elsewhere (the fewest batches)."""
    return CPU_CALL_TOKENS if device_type == "cpu" else None


def _runs(
    lengths: Sequence[int], size: int, tokens: int | None, call_tokens: int | None = None
) -> list[list[int]]:
    """`micro_batches` on positions: runs of consecutive positions in the longest-first order
    (a stable sort: ties keep their order), longest run first, each run's positions ascending.

    A run holds at most ``size`` examples (with ``tokens``: as many as fit ``tokens`` padded
    positions; an example longer than that alone). Among such splits, the cheapest: with
    ``call_tokens`` None the fewest runs, then the fewest padded positions; else the fewest
    padded positions plus ``call_tokens`` a run. Exact, by dynamic programming over the sorted
    lengths (the cheapest split of the first j is the cheapest split of some first i and the run
    i..j−1, padded to the i-th length); of equal costs the longer last run."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    desc = [lengths[i] for i in order]
    n = len(desc)
    cost: list[tuple[int, ...]] = [(0, 0)] + [(sys.maxsize, 0)] * n  # (runs, padded) or (price,)
    runs, padded, cut = [0] * (n + 1), [0] * (n + 1), [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):  # the run i..j−1: longer as i falls, padded to desc[i]
            count = j - i
            if count > 1 and (count > size if tokens is None else count * desc[i] > tokens):
                break
            r, p = runs[i] + 1, padded[i] + count * desc[i]
            c = (r, p) if call_tokens is None else (call_tokens * r + p,)
            if c <= cost[j]:
                cost[j], runs[j], padded[j], cut[j] = c, r, p, i
    out: list[list[int]] = []
    while n > 0:
        out.append(sorted(order[cut[n] : n]))
        n = cut[n]
    return out[::-1]


def micro_batches(
    examples: Sequence,
    *,
    size: int = CalibrationConfig.micro_batch_size,
    tokens: int | None = None,
    call_tokens: int | None = None,
) -> list[list]:
    """Split ``examples`` into micro-batches of examples of neighbouring lengths, longest first,
    so each batch pads little (`_runs`): at most ``size`` examples each, or with ``tokens`` as
    many as fit ``tokens`` padded positions (an example longer than ``tokens`` goes alone); the
    fewest batches (``call_tokens`` None), or as many as pay, a batch priced at
    ``call_tokens`` padded tokens (the stage on the CPU: `CPU_CALL_TOKENS`). Each batch keeps
    its examples in the order given, so ``examples`` that fit one batch are that batch as given.
    The split changes only the summation order of the gradient, not its value.

    By length and not in calibration order: on two chatterbot sources × 96 dialogues (SmolLM2's
    tokenizer, batches of 8; 11,529 real tokens) consecutive examples padded to 17,424 tokens
    and by length to 12,624 (`docs/performance.md`, fold sketches)."""
    runs = _runs([e.n_tokens for e in examples], size, tokens, call_tokens)
    return [[examples[i] for i in run] for run in runs]


def deal_folds(examples: Sequence, folds: int) -> list[list]:
    """``examples`` dealt into ``folds`` folds: example i (in calibration order) goes to fold
    i mod ``folds``, so the folds differ in size by at most one and each is a spread of the
    calibration draw (not its first or last part)."""
    if not 1 <= folds <= len(examples):
        raise ValueError(
            f"{len(examples)} calibration examples cannot be dealt into {folds} folds: need "
            "1 <= calibration.folds <= the examples of every source (1 turns folds off)"
        )
    return [list(examples[f::folds]) for f in range(folds)]


def fold_batches(
    examples: Sequence,
    folds: int,
    *,
    size: int = CalibrationConfig.micro_batch_size,
    tokens: int | None = None,
    deal: str = CalibrationConfig.fold_deal,
    call_tokens: int | None = None,
) -> list[list[list]]:
    """The micro-batches of each of ``folds`` folds of ``examples`` (calibration order).

    ``deal="examples"`` (the default): the examples are dealt (`deal_folds`, i mod m) and each
    fold is batched by length on its own (`micro_batches`, ``call_tokens`` the price of a
    batch). ``deal="batches"``: when the source's own fewest micro-batches (`micro_batches`
    over all its examples, ``call_tokens`` None, so the folds do not depend on the device)
    number at least 2 × ``folds``, the
    batches are dealt to the folds as `deal_folds` deals examples, in the calibration order of
    each batch's first example, so every fold holds at least two whole batches and the stage
    pads exactly as it does without folds; with fewer batches, the examples are dealt.

    Why "batches": a micro-batch cannot span two folds, so batching within folds of n/m
    examples pads each batch to a wider spread of lengths. On 4 chatterbot sources × 96
    dialogues (SmolLM2's tokenizer, batches of 8, medians over 100 calibration orders): 28,512
    padded tokens without folds (25,651 real), 33,568 with 4 folds dealt by example (1.18×),
    28,512 dealt by batch; on the demo at n = 200, 1.013× by example
    (`benchmarks/bench_fold_deal.py`). With batches priced as on the CPU (``call_tokens``
    `CPU_CALL_TOKENS`), folds dealt by example pad less than with the fewest batches, in more
    batches (`docs/performance.md`, micro-batches at a price).

    Why not by default: a fold is then a sample of whole batches of length neighbours. Two
    halves are still disjoint draws from the calibration examples, but clustered by length, so
    where a source's gradient changes with its examples' length they differ more than two draws
    of single examples: the stability reads conservative (in batches of 8, each cosine's
    standard error 1.25× larger on the demo at n = 200 and 1.51× on SmolLM2 at n = 96,
    `benchmarks/bench_fold_deal.py`)."""
    check_deal(deal)
    by_example = deal_folds(examples, folds)  # refuses more folds than examples
    if deal == "batches" and folds > 1:
        runs = _runs([e.n_tokens for e in examples], size, tokens)
        if len(runs) >= 2 * folds:
            dealt = deal_folds(sorted(runs, key=min), folds)
            return [[[examples[i] for i in run] for run in fold] for fold in dealt]
    return [
        micro_batches(fold, size=size, tokens=tokens, call_tokens=call_tokens)
        for fold in by_example
    ]


def fold_batching(
    folds: int, size: int, tokens: int | None, deal: str = CalibrationConfig.fold_deal
) -> Mapping[str, Any] | None:
    """What decides the folds' examples besides their count (`fold_batches`): None when it is
    the calibration order alone (one fold, or examples dealt), else the deal and the
    micro-batching. A part's fold rows are reused only under the same."""
    if folds == 1 or deal == "examples":
        return None
    batching = {"micro_batch_tokens": tokens} if tokens is not None else {"micro_batch_size": size}
    return {"fold_deal": deal} | batching


def padded_calls(batches: Sequence[Sequence]) -> tuple[int, int]:
    """(calls, padded tokens) of micro-batches of examples (``n_tokens``): each batch is one
    forward/backward, padded to its longest example (`merit_lab.data.formatting.collate`)."""
    return len(batches), sum(len(b) * max(e.n_tokens for e in b) for b in batches)


def fold_batching_cost(examples: Sequence, folds: int, **batching: Any) -> dict[str, list[int]]:
    """What forming the micro-batches within ``folds`` folds does to one source's stage:
    ``{"folds": [calls, padded tokens], "one_fold": [calls, padded tokens]}``, the batches
    `fold_batches` runs with these keyword arguments (``size``, ``tokens``, ``deal``,
    ``call_tokens``) and those it runs with one fold. A micro-batch cannot span two folds, so
    the first pads more, or runs more calls, or both: part of the folds' cost that the time of
    their sketch passes does not hold."""
    with_folds = [b for fold in fold_batches(examples, folds, **batching) for b in fold]
    (alone,) = fold_batches(examples, 1, **batching)
    return {"folds": list(padded_calls(with_folds)), "one_fold": list(padded_calls(alone))}
