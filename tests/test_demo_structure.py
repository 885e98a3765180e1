"""The demo's planted conflict structure, recovered through the package's own pipeline.

One exact gradient per demo source at the committed base model (all parameters, 200 calibration
examples each) is computed once; the default count-sketch is applied to the same gradients, so
sketch fidelity and structure recovery are measured on real source gradients at θ0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from merit_lab.conflict import compute_conflict_space
from merit_lab.gradients import estimate_gradients
from merit_lab.mixture import load_mixture
from merit_lab.models import load_model, load_tokenizer, select_parameters
from merit_lab.partition import split_balanced
from merit_lab.sketch import SketchSpec, build_sketch, sketch_fidelity


@pytest.fixture(scope="module")
def demo():
    tok = load_tokenizer("demo")
    model = load_model("demo", device="cpu")
    mixture = load_mixture("demo")
    exact = estimate_gradients(
        model, tok, mixture, sketch=SketchSpec(kind="exact"), n=200, micro_batch_size=50,
        progress=False,
    )  # fmt: skip
    # The default sketch of the very same gradients (the sketch is linear, so this equals
    # sketching inside estimate_gradients; test_gradients checks that path).
    params = [(n, tuple(p.shape)) for n, p in select_parameters(model)]
    sk = build_sketch(SketchSpec(), params)
    rows = np.stack([sk.sketch_flat(torch.from_numpy(row)).numpy() for row in exact.rows])
    return mixture, exact, rows


def _labels(mixture, names, key):
    return [mixture[n].metadata[key] for n in names]


def test_default_sketch_preserves_cosines(demo):
    _, exact, sketched = demo
    fid = sketch_fidelity(exact.rows, sketched)
    assert fid["pearson"] >= 0.99, fid


def test_planted_structure_is_recovered(demo):
    mixture, exact, sketched = demo
    axes = list(mixture.info["axes"])
    assert len(axes) >= 2, f"demo metadata lacks two planted axes: {mixture.info}"
    space = compute_conflict_space(sketched, exact.names)
    examples = {s.name: len(s.train) for s in mixture}
    tokens = {s.name: len(s.train) for s in mixture}
    one = split_balanced(space, examples, tokens, r=1)
    two = split_balanced(space, examples, tokens, r=2)
    names = list(exact.names)
    best_axis = max(
        adjusted_rand_score(_labels(mixture, names, a), one.labels(names)) for a in axes
    )
    combined = ["|".join(str(mixture[n].metadata[a]) for a in axes[:2]) for n in names]
    ari2 = adjusted_rand_score(combined, two.labels(names))
    print(f"r=1 ARI {best_axis:.3f}, r=2 ARI {ari2:.3f}, EV {space.explained_variance_ratio[:4]}")
    assert best_axis >= 0.8
    assert ari2 >= 0.7
