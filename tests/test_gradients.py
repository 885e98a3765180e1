from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import merit_lab.gradients.estimate as gradients_mod
from merit_lab.data.formatting import tokenize_examples
from merit_lab.data.mixture import Mixture, load_mixture
from merit_lab.envelope import EnvelopeError
from merit_lab.gradients.bank import GradientBank
from merit_lab.gradients.batching import micro_batches
from merit_lab.gradients.estimate import estimate_gradients
from merit_lab.gradients.sketch import SketchSpec

EXACT = SketchSpec(kind="exact")


class _Killed(Exception):
    """Stands in for SIGKILL (KeyboardInterrupt would stop pytest itself)."""


@pytest.fixture(scope="module")
def small_demo():
    """Four demo sources; the first 12 calibration examples of each are used."""
    m = load_mixture("demo")
    return m.select(m.names[:4])


def test_micro_batches_equal_one_batch(pico_model, demo_tokenizer, small_demo):
    one = estimate_gradients(
        pico_model,
        demo_tokenizer,
        small_demo,
        sketch=EXACT,
        n=12,
        micro_batch_size=12,
        progress=False,
    )
    many = estimate_gradients(
        pico_model,
        demo_tokenizer,
        small_demo,
        sketch=EXACT,
        n=12,
        micro_batch_size=5,
        progress=False,
    )
    assert one.rows.shape == (4, sum(p.numel() for p in pico_model.parameters()))
    np.testing.assert_allclose(many.rows, one.rows, rtol=1e-5, atol=1e-6 * np.abs(one.rows).max())
    for name in small_demo.names:
        assert one.stats[name]["loss"] == pytest.approx(many.stats[name]["loss"], rel=1e-6)
        assert one.stats[name]["grad_norm"] == pytest.approx(np.linalg.norm(one.row(name)), 1e-5)


def test_micro_batches_go_by_length_and_keep_the_given_order_within_each():
    """Runs of at most ``size`` by length (longest first, ties in the given order): the fewest,
    then the least padded; each batch in the given order; examples that fit one batch are that
    batch as given (a fold of the demo)."""
    ex = [
        dataclasses.make_dataclass("Ex", ["i", "n_tokens"])(i, n)
        for i, n in enumerate([5, 9, 1, 9, 3, 7, 2, 8])
    ]
    # by length: 9 (1), 9 (3), 8 (7) | 7 (5), 5 (0) | 3 (4), 2 (6), 1 (2): three batches, of
    # the splits into three the least padded (3·9 + 2·7 + 3·3 = 50; 3, 3, 2 would pad to 52)
    assert [[e.i for e in b] for b in micro_batches(ex, size=3)] == [[1, 3, 7], [0, 5], [2, 4, 6]]
    assert [[e.i for e in b] for b in micro_batches(ex, size=8)] == [list(range(8))]
    assert [[e.i for e in b] for b in micro_batches(ex, size=1)] == [
        [1],
        [3],
        [7],
        [5],
        [0],
        [4],
        [6],
        [2],
    ]
    padded = sum(len(b) * max(e.n_tokens for e in b) for b in micro_batches(ex, size=3))
    assert padded == 3 * 9 + 2 * 7 + 3 * 3  # 50; consecutive runs pad to 3·9 + 3·9 + 2·8 = 70


def test_gradient_matches_finite_difference(pico_model, demo_tokenizer, small_demo):
    model = copy.deepcopy(pico_model).double()
    src = small_demo.sources[0]
    bank = estimate_gradients(
        model,
        demo_tokenizer,
        small_demo.select([src.name]),
        sketch=EXACT,
        n=6,
        micro_batch_size=4,
        progress=False,
    )
    g = torch.from_numpy(bank.rows[0]).double()  # float32 storage of a float64 gradient
    examples = tokenize_examples(demo_tokenizer, src.calibration[:6])
    params = [p for p in model.parameters()]
    theta = torch.nn.utils.parameters_to_vector(params).detach().clone()
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v /= v.norm()

    def loss_at(x: torch.Tensor) -> float:
        torch.nn.utils.vector_to_parameters(x, params)
        with torch.no_grad():
            loss, _ = _mean_loss(model, examples, demo_tokenizer.pad_token_id)
        return loss

    # Llama's RMSNorm computes in float32 even in a float64 model, so the loss carries ~1e-9
    # noise: a larger step keeps that noise out of the difference quotient (the central
    # difference's own error is O(eps^2) ~ 1e-6 relative here).
    eps = 1e-3
    fd = (loss_at(theta + eps * v) - loss_at(theta - eps * v)) / (2 * eps)
    torch.nn.utils.vector_to_parameters(theta, params)
    assert float(g @ v) == pytest.approx(fd, rel=1e-4)
    assert abs(float(g @ v)) > 1e-3  # the direction is not orthogonal to the gradient


def _mean_loss(model, examples, pad_id):
    from merit_lab.data.formatting import IGNORE_INDEX, collate

    b = collate(examples, pad_id)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        b["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    return float(loss), None


def test_resume_after_kill_and_incremental_sources(
    pico_model, demo_tokenizer, small_demo, tmp_path, monkeypatch
):
    kwargs = dict(sketch=SketchSpec(dim=256, seed=1), n=8, micro_batch_size=8, progress=False)
    full = estimate_gradients(pico_model, demo_tokenizer, small_demo, **kwargs)
    calls: list[int] = []
    killed: list[int] = []
    real = gradients_mod.source_gradient

    def dies_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3 and not killed:
            killed.append(1)
            raise _Killed  # stands in for a kill after two finished sources
        return real(*a, **k)

    monkeypatch.setattr(gradients_mod, "source_gradient", dies_on_third)
    with pytest.raises(_Killed):
        estimate_gradients(pico_model, demo_tokenizer, small_demo, out_dir=tmp_path, **kwargs)
    assert len(list((tmp_path / "parts").glob("*.safetensors"))) == 2
    assert not (tmp_path / "bank.json").exists()
    assert all(p.requires_grad for p in pico_model.parameters())  # flags restored

    calls.clear()
    first3 = small_demo.names[:3]
    bank = estimate_gradients(
        pico_model, demo_tokenizer, small_demo, out_dir=tmp_path, sources=first3, **kwargs
    )
    assert len(calls) == 1  # only the unfinished source is computed
    np.testing.assert_array_equal(bank.rows, full.rows[:3])

    calls.clear()
    bank = estimate_gradients(pico_model, demo_tokenizer, small_demo, out_dir=tmp_path, **kwargs)
    assert len(calls) == 1  # adding one source computes only that one
    np.testing.assert_array_equal(bank.rows, full.rows)

    calls.clear()
    part = sorted((tmp_path / "parts").glob("*.safetensors"))[0]
    part.write_bytes(part.read_bytes()[:40])  # a part cut short (a killed copy): redone
    bank = estimate_gradients(pico_model, demo_tokenizer, small_demo, out_dir=tmp_path, **kwargs)
    assert len(calls) == 1
    np.testing.assert_array_equal(bank.rows, full.rows)
    loaded = GradientBank.load(tmp_path)
    assert loaded.names == small_demo.names
    np.testing.assert_array_equal(loaded.rows, full.rows)

    calls.clear()
    other = estimate_gradients(
        pico_model,
        demo_tokenizer,
        small_demo,
        out_dir=tmp_path,
        **{**kwargs, "sketch": SketchSpec(dim=256, seed=2)},
    )
    assert len(calls) == 4  # another sketch seed never reuses old parts
    assert not np.allclose(other.rows, full.rows)


def test_two_processes_same_seed_identical_rows(pico_model, demo_tokenizer, small_demo, tmp_path):
    script = textwrap.dedent(
        f"""
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # this process's: the same rounding
        from merit_lab.gradients.batching import micro_batches
        from merit_lab.gradients.estimate import estimate_gradients
        from merit_lab.data.mixture import load_mixture
        from merit_lab.models.loading import build_pico_llama, load_tokenizer
        from merit_lab.gradients.sketch import SketchSpec
        tok = load_tokenizer("demo")
        m = load_mixture("demo")
        m = m.select(m.names[:4])
        model = build_pico_llama(vocab_size=len(tok), seed=0)
        estimate_gradients(model, tok, m, sketch=SketchSpec(dim=512, seed=7), n=8,
                           out_dir=r"{tmp_path}", progress=False)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[1])
    here = estimate_gradients(
        pico_model,
        demo_tokenizer,
        small_demo,
        sketch=SketchSpec(dim=512, seed=7),
        n=8,
        progress=False,
    )
    np.testing.assert_array_equal(GradientBank.load(tmp_path).rows, here.rows)


def test_parameter_selection_and_non_finite_loss(pico_model, demo_tokenizer, small_demo):
    mlp = estimate_gradients(
        pico_model,
        demo_tokenizer,
        small_demo,
        sketch=EXACT,
        n=4,
        include=["*.mlp.*"],
        progress=False,
    )
    n_mlp = sum(p.numel() for n, p in pico_model.named_parameters() if ".mlp." in n)
    assert mlp.rows.shape[1] == n_mlp == mlp.info["n_parameters"]
    broken = copy.deepcopy(pico_model)
    with torch.no_grad():
        broken.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=small_demo.names[0]) as err:  # a FloatingPointError too
        estimate_gradients(broken, demo_tokenizer, small_demo, n=4, progress=False)
    assert isinstance(err.value, FloatingPointError)
    assert "non-finite weights in ['model.layers.0.mlp.up_proj.weight'] (1 tensor(s))" in str(
        err.value
    )


def test_prefetch_thread_changes_nothing_and_errors_name_their_source(
    pico_model, demo_tokenizer, small_demo
):
    kw = {"sketch": SketchSpec(dim=512, seed=3), "n": 8, "progress": False}
    sync = estimate_gradients(pico_model, demo_tokenizer, small_demo, prefetch=False, **kw)
    ahead = estimate_gradients(pico_model, demo_tokenizer, small_demo, prefetch=True, **kw)
    np.testing.assert_array_equal(ahead.rows, sync.rows)
    assert list(ahead.stats) == list(sync.stats) == list(small_demo.names)
    empty = dataclasses.replace(small_demo.sources[2], calibration=())
    broken = Mixture((*small_demo.sources[:2], empty, *small_demo.sources[3:]))
    for prefetch in (False, True):
        with pytest.raises(ValueError, match=f"source {empty.name!r} has no calibration"):
            estimate_gradients(pico_model, demo_tokenizer, broken, prefetch=prefetch, **kw)


def test_bank_json_is_enveloped_and_a_legacy_one_still_loads(tmp_path):
    """bank.json carries the header; a newer version or another format is refused naming the
    file; a bank.json from before the envelope (no header) reads as version 1."""
    rows = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, 4.0]], dtype=np.float32)
    stats = {"a": {"loss": 1.5}, "b": {"loss": 2.0}}
    bank = GradientBank(("a", "b"), rows, {"key": "k1", "n": 4}, stats)
    path = bank.save(tmp_path) / "bank.json"
    doc = json.loads(path.read_text())
    assert list(doc)[:2] == ["format", "version"]
    assert doc == {
        "format": "merit-lab/gradient-bank",
        "version": 1,
        "names": ["a", "b"],
        "info": {"key": "k1", "n": 4},
        "stats": stats,
    }
    cases = [
        ({**doc, "version": 2}, "bank.json: merit-lab/gradient-bank version 2 is not one"),
        ({**doc, "format": "merit-lab/layer-bank"}, "holds 'merit-lab/layer-bank', not"),
    ]
    for bad, match in cases:
        path.write_text(json.dumps(bad))
        with pytest.raises(EnvelopeError, match=match):
            GradientBank.load(tmp_path)
    path.write_text(json.dumps({k: v for k, v in doc.items() if k not in ("format", "version")}))
    back = GradientBank.load(tmp_path)
    assert back.names == ("a", "b") and back.info == bank.info and back.stats == stats
    np.testing.assert_array_equal(back.rows, rows)
