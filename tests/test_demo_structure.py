"""The demo's planted conflict structure and the default sketch's fidelity, on real gradients.

Exact gradients of every demo source at the committed base (all 653k parameters, 200 examples
each) are computed twice, once per module (about 40 s each on 2 cores):

- ``demo``: the calibration split, which is what the gradient stage uses and what
  ``benchmarks/bench_sketch.py`` chose the default width 2^18 on (sketch seeds 0, 1, 2);
- ``heldout``: the first 200 train examples of each source, which played no part in that choice.

The count-sketch is linear, so sketching the exact rows equals sketching inside
``estimate_gradients`` (test_gradients checks that path).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from merit_lab.analysis.conflict import compute_conflict_space
from merit_lab.data.mixture import Mixture, load_mixture
from merit_lab.gradients.estimate import estimate_gradients
from merit_lab.gradients.sketch import SketchSpec, build_sketch, sketch_fidelity
from merit_lab.models.loading import load_model, load_tokenizer, select_parameters
from merit_lab.partition.methods import split_balanced

MAX_ERR = 0.005  # the target that fixed DEFAULT_SKETCH_DIM (config.py, benchmarks/bench_sketch.py)
SELECTION_SEEDS = (0, 1, 2)  # the seeds the width was chosen at
HELDOUT_SEEDS = tuple(range(3, 11))  # the next eight, fixed before looking at any of them
# The slow tier (`make test-slow`): exact gradients of the whole demo, twice (6,400 examples).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base():
    model = load_model("demo", device="cpu")
    return load_tokenizer("demo"), model, [(n, tuple(p.shape)) for n, p in select_parameters(model)]


def _exact_rows(base, mixture: Mixture) -> np.ndarray:
    tok, model, _ = base
    bank = estimate_gradients(
        model,
        tok,
        mixture,
        sketch=SketchSpec(kind="exact"),
        n=200,
        micro_batch_size=50,
        progress=False,
    )
    assert list(bank.names) == list(mixture.names)
    return bank.rows


def _sketched(base, rows: np.ndarray, spec: SketchSpec) -> np.ndarray:
    sk = build_sketch(spec, base[2])
    return np.stack([sk.sketch_flat(torch.from_numpy(row)).numpy() for row in rows])


@pytest.fixture(scope="module")
def demo(base):
    """The demo mixture, its exact calibration gradients and their default sketch (seed 0)."""
    mixture = load_mixture("demo")
    exact = _exact_rows(base, mixture)
    return mixture, exact, _sketched(base, exact, SketchSpec())


@pytest.fixture(scope="module")
def heldout(base):
    """Exact gradients of each demo source's first 200 *train* examples (same sources, other
    examples): gradients the default sketch width was not chosen on."""
    mixture = load_mixture("demo")
    swapped = Mixture(
        tuple(dataclasses.replace(s, calibration=s.train[:200]) for s in mixture),
        mixture.origin,
        mixture.seed,
        mixture.info,
    )
    other_ids = {e["id"] for s in swapped for e in s.calibration}
    assert other_ids.isdisjoint(e["id"] for s in mixture for e in s.calibration)
    return mixture, _exact_rows(base, swapped)


def _labels(mixture, names, key):
    return [mixture[n].metadata[key] for n in names]


def test_default_sketch_meets_the_target_it_was_chosen_at(demo, base):
    """In-sample: the README's "max cosine error ≤ 0.005 at 3 seeds" on the very gradients and
    seeds 2^18 was picked on (measured 0.0043, 0.0050, 0.0043)."""
    _, exact, _ = demo
    for seed in SELECTION_SEEDS:
        fid = sketch_fidelity(exact, _sketched(base, exact, SketchSpec(seed=seed)))
        assert fid["max_abs_error"] <= MAX_ERR, (seed, fid)


def test_default_sketch_on_heldout_gradients_and_seeds(heldout, base):
    """Out of sample: other examples and seeds 3-10. 2^18 meets 0.005 at the run's default seed
    and at the median seed, not at every seed.

    Measured (496 pairs): seed 0: 0.0043; seeds 3-10: 0.0043 0.0037 0.0039 0.0040 0.0116 0.0045
    0.0055 0.0043 (median 0.0043); mean |error| 0.0009-0.0020, Pearson ≥ 0.99997 at each. Over
    seeds 0-63 the max exceeds 0.005 at 20 of 64 (worst 0.0116, seed 7, where two of the 200
    heaviest coordinates share a bucket: the error is heavy-tailed, not Gaussian).
    """
    _, exact = heldout
    default = sketch_fidelity(exact, _sketched(base, exact, SketchSpec()))
    assert default["max_abs_error"] <= MAX_ERR, default
    fids = {
        s: sketch_fidelity(exact, _sketched(base, exact, SketchSpec(seed=s))) for s in HELDOUT_SEEDS
    }
    worst = np.array([f["max_abs_error"] for f in fids.values()])
    assert np.median(worst) <= MAX_ERR, fids
    assert (worst <= MAX_ERR).sum() >= 6, fids  # 6 of 8 measured
    assert worst.max() <= 2.5 * MAX_ERR, fids  # a heavy-coordinate collision: 0.0116 measured
    for seed, fid in fids.items():
        # The 1/5 subsample reaches Pearson 0.9965 and max error 0.091: both would fail here.
        assert fid["pearson"] >= 0.9999 and fid["mean_abs_error"] <= 0.0025, (seed, fid)


def _structure(mixture, rows, names):
    """The conflict space and the r = 1, 2 balanced splits, and their ARIs against the axes."""
    space = compute_conflict_space(rows, names)
    examples = {s.name: len(s.train) for s in mixture}
    one = split_balanced(space, examples, examples, r=1).labels(names)
    two = split_balanced(space, examples, examples, r=2).labels(names)
    style, case = _labels(mixture, names, "style"), _labels(mixture, names, "case")
    style_case = [f"{a}|{b}" for a, b in zip(style, case, strict=True)]
    ari = {
        "pc1~style": adjusted_rand_score(style, space.embedding[:, 0] > 0),
        "pc2~case": adjusted_rand_score(case, space.embedding[:, 1] > 0),
        "r1~style": adjusted_rand_score(style, one),
        "r1~case": adjusted_rand_score(case, one),
        "r2~style×case": adjusted_rand_score(style_case, two),
    }
    return space, ari


def test_planted_structure_is_recovered(demo):
    """The README's claim, on the demo's own bank (calibration gradients, default sketch):
    style on PC1 (36%), case on PC2 (26%), r = 1 is style and r = 2 is style × case, each with
    adjusted Rand index exactly 1.0 (measured: 1.0 everywhere, r = 1 against case −0.03)."""
    mixture, _, sketched = demo
    assert list(mixture.info["axes"]) == ["style", "case"]
    names = list(mixture.names)
    space, ari = _structure(mixture, sketched, names)
    print(ari, space.explained_variance_ratio[:4])
    assert round(100 * space.explained_variance_ratio[0]) == 36  # 0.3607 measured
    assert round(100 * space.explained_variance_ratio[1]) == 26  # 0.2637
    assert ari["pc1~style"] == ari["pc2~case"] == 1.0, ari
    assert ari["r1~style"] == ari["r2~style×case"] == 1.0, ari
    assert ari["r1~case"] < 0.1, ari  # r = 1 cuts along style only


def test_planted_structure_holds_on_other_examples(heldout):
    """The same recovery from 200 other examples per source (exact gradients): the structure is
    the sources', not the calibration draw's (PC1 37%, PC2 26% measured)."""
    mixture, exact = heldout
    _, ari = _structure(mixture, exact, list(mixture.names))
    assert ari["pc1~style"] == ari["pc2~case"] == 1.0, ari
    assert ari["r1~style"] == ari["r2~style×case"] == 1.0, ari
