"""The image-text demo: its committed mixture is what the generator writes, θ0 does the tasks
while hedging between the planted conventions, and the conflict space of its gradients recovers
the planted axes (r = 1 splits on one axis, r = 2 on both), from the committed base and mixture.
"""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from merit_lab.analysis.conflict import compute_conflict_space
from merit_lab.data.formatting import tokenize_examples
from merit_lab.data.mixture import load_mixture
from merit_lab.demo import DEMO_VL_DIR
from merit_lab.demo.vl_tasks import generate_vl_mixture
from merit_lab.evaluation.evaluate import greedy_answers, heldout_loss
from merit_lab.gradients.estimate import estimate_gradients
from merit_lab.gradients.sketch import SketchSpec
from merit_lab.models.loading import load_model, load_tokenizer
from merit_lab.partition.methods import split_balanced

BASE = DEMO_VL_DIR / "base"
MIN_RIGHT = 0.7  # θ0's share of right words over the four families
MAX_LOSS_RATIO = 1.3  # θ0's nats per held-out answer, highest over lowest convention


@pytest.fixture(scope="module")
def demo():
    return load_mixture(DEMO_VL_DIR, calibration_n=48), load_tokenizer(BASE), load_model(BASE)


def test_committed_mixture_is_the_generators(tmp_path):
    out = generate_vl_mixture(tmp_path / "vl")
    for sub in ("train", "calibration", "eval", "images/colour", "images/count"):
        cmp = filecmp.dircmp(out / sub, DEMO_VL_DIR / sub)
        assert not cmp.left_only and not cmp.right_only, sub
        _, mismatch, errors = filecmp.cmpfiles(out / sub, DEMO_VL_DIR / sub, cmp.common_files)
        assert not mismatch and not errors, (sub, mismatch[:3])
    assert (out / "sources.json").read_bytes() == (DEMO_VL_DIR / "sources.json").read_bytes()


def _word(answer: str) -> str:
    return answer.removeprefix("Answer: ").removesuffix(".").lower()


@pytest.mark.slow  # about 80 s on 2 busy cores
def test_base_does_the_tasks_and_hedges_between_conventions(demo):
    """θ0's greedy answers on held-out pictures hold the right word (in any convention) for most
    examples, and its held-out loss is about the same under each of the four conventions: it
    does the tasks and hedges between the planted variants."""
    mixture, tok, model = demo
    per_family = {}
    for family in ("colour", "count", "position", "shape"):
        examples = mixture[f"{family}-terse-lower"].eval
        got = greedy_answers(model, tok, examples, max_new_tokens=16)
        truth = [ex["messages"][-1]["content"] for ex in examples]
        per_family[family] = np.mean([_word(a) == t for a, t in zip(got, truth, strict=True)])
    right = np.mean(list(per_family.values()))
    loss = {}
    for style in ("terse", "verbose"):
        for case in ("lower", "upper"):
            names = [n for n in mixture.names if n.endswith(f"-{style}-{case}")]
            examples = [ex for n in names for ex in mixture[n].eval]
            tokens = sum(t.n_response_tokens for t in tokenize_examples(tok, examples, 128))
            # nats per answer: a verbose answer has more tokens, most of them certain
            loss[style, case] = heldout_loss(model, tok, examples, max_length=128) * tokens
            loss[style, case] /= len(examples)
    print(f"θ0 right word: {right:.2f}", per_family, loss)
    assert right >= MIN_RIGHT, per_family
    assert max(loss.values()) / min(loss.values()) < MAX_LOSS_RATIO, loss


@pytest.mark.slow  # about 60 s on 2 busy cores
def test_planted_axes_are_recovered(demo):
    """The default sketch of the 16 sources' calibration gradients: style on PC1 (27%), case on
    PC2 (24%); r = 1 splits along style and r = 2 along style × case, adjusted Rand index 1.0
    (measured: r = 1 against case −0.07, against family −0.11)."""
    mixture, tok, model = demo
    bank = estimate_gradients(
        model,
        tok,
        mixture,
        sketch=SketchSpec(),
        n=48,
        micro_batch_size=48,
        max_length=128,
        save_bank=False,
        progress=False,
    )
    names = list(bank.names)
    space = compute_conflict_space(bank.rows, names)
    examples = {s.name: len(s.train) for s in mixture}
    one = split_balanced(space, examples, examples, r=1).labels(names)
    two = split_balanced(space, examples, examples, r=2).labels(names)
    meta = {k: [mixture[n].metadata[k] for n in names] for k in ("style", "case", "family")}
    both = [f"{a}|{b}" for a, b in zip(meta["style"], meta["case"], strict=True)]
    ari = {
        "r1~style": adjusted_rand_score(meta["style"], one),
        "r1~case": adjusted_rand_score(meta["case"], one),
        "r1~family": adjusted_rand_score(meta["family"], one),
        "r2~style×case": adjusted_rand_score(both, two),
    }
    print(ari, space.explained_variance_ratio[:4])
    assert ari["r1~style"] == ari["r2~style×case"] == 1.0, ari
    assert ari["r1~case"] < 0.1 and ari["r1~family"] < 0.1, ari  # r = 1 cuts along style only
    assert round(100 * space.explained_variance_ratio[0]) == 27  # 0.2713 measured: style
    assert round(100 * space.explained_variance_ratio[1]) == 24  # 0.2378: case
