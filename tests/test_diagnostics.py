"""Diagnostics: interpolation barriers, displacements, flatness, curvature and the gain identity."""

from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest
import torch

from merit_lab.data.formatting import IGNORE_INDEX
from merit_lab.diagnostics import (
    ResponseLoss,
    build_curvature_matvec,
    displacement,
    displacement_ratio,
    exact_hessian,
    group_means,
    hessian_top_eigs,
    hvp,
    interpolation_curve,
    lanczos_top_eigs,
    load_weights,
    make_loss_fn,
    make_loss_graph_fn,
    merging_gain,
    norm_inequality,
    perturbation_curve,
    predicted_partition_gain,
    quadratic_gain_prediction,
    spectral_filtering,
    stack_deltas,
    summarize_perturbation,
)
from merit_lab.evaluation.evaluate import heldout_loss
from merit_lab.models.loading import build_pico_llama, select_parameters
from merit_lab.partition.gain import predict_gain
from merit_lab.partition.plan import Partition
from tests.conftest import chat

EXAMPLES = [chat(f"add {a} {b}", str(a + b)) for a, b in [(1, 2), (3, 4), (5, 9)]]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(model, snap):
    now = model.state_dict()
    assert set(now) == set(snap)
    assert all(torch.equal(now[k], snap[k]) for k in snap)


@pytest.fixture(scope="module")
def pico_pair(demo_tokenizer):
    v = len(demo_tokenizer)
    return build_pico_llama(vocab_size=v, seed=1), build_pico_llama(vocab_size=v, seed=2)


@pytest.fixture
def loss_fn(demo_tokenizer):
    return make_loss_fn(demo_tokenizer, EXAMPLES, max_length=64)


def _rms_norm_float64(self, x: torch.Tensor) -> torch.Tensor:
    # LlamaRMSNorm computes in float32 whatever the dtype, which would cap finite differences at
    # ~1e-4; the same formula without the cast keeps the tiny model float64 end to end.
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


VOCAB = 10


def tiny_llama(seed: int = 0):
    """A float64 Llama with 568 parameters (vocab 10, hidden 8, one layer): exact Hessians."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so curvature is not all in lm_head
        for p in model.parameters():
            p.mul_(8.0) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    for m in model.modules():
        if isinstance(m, LlamaRMSNorm):
            m.forward = types.MethodType(_rms_norm_float64, m)
    return model


def tiny_loss(seed: int = 0) -> ResponseLoss:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 6), generator=g)
    labels = ids.clone()
    labels[:, :2] = IGNORE_INDEX  # a prompt that carries no loss
    mask = torch.ones_like(ids)
    return ResponseLoss({"input_ids": ids, "attention_mask": mask, "labels": labels})


# ------------------------------------------------------------------------------ interpolation
def test_barrier_of_a_model_with_itself_is_zero(pico_model, loss_fn, one_thread):
    theta = load_weights(pico_model)
    curve = interpolation_curve(
        pico_model, theta, theta, loss_fn, alphas=[0, 0.3, 1], progress=False
    )
    assert curve["barrier"] == 0.0
    assert np.all(curve["excess"] == 0.0)
    assert np.all(curve["losses"] == curve["losses"][0])


def test_interpolation_endpoints_midpoint_and_restore(pico_model, pico_pair, loss_fn, one_thread):
    a, b = pico_pair
    snap = snapshot(pico_model)
    curve = interpolation_curve(pico_model, a, b, loss_fn, alphas=[0, 0.5, 1], progress=False)
    assert_identical(pico_model, snap)
    assert curve["losses"][0] == loss_fn(a) == curve["loss_a"]
    assert curve["losses"][2] == loss_fn(b) == curve["loss_b"]
    mid = build_pico_llama(vocab_size=a.config.vocab_size, seed=9)
    mid.load_state_dict({k: 0.5 * (v + b.state_dict()[k]) for k, v in a.state_dict().items()})
    assert curve["losses"][1] == pytest.approx(loss_fn(mid), rel=1e-6)
    chord = 0.5 * (curve["loss_a"] + curve["loss_b"])
    assert curve["excess"][1] == pytest.approx(curve["losses"][1] - chord, abs=1e-12)
    assert curve["barrier"] == max(0.0, float(curve["excess"].max()))


def test_interpolation_restores_weights_when_the_loss_raises(pico_model, pico_pair):
    snap = snapshot(pico_model)
    calls = []

    def bad_loss(model):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return 1.0

    with pytest.raises(RuntimeError, match="boom"):
        interpolation_curve(pico_model, *pico_pair, bad_loss, progress=False)
    assert_identical(pico_model, snap)


def test_interpolation_rejects_mismatched_or_nan_weights(pico_model, pico_pair):
    a = load_weights(pico_pair[0])
    b = dict(a)
    b.pop("lm_head.weight")
    with pytest.raises(ValueError, match="different tensors"):
        interpolation_curve(pico_model, a, b, lambda m: 0.0, progress=False)
    b = dict(a, **{"lm_head.weight": torch.full_like(a["lm_head.weight"], float("nan"))})
    with pytest.raises(ValueError, match="NaN"):
        interpolation_curve(pico_model, a, b, lambda m: 0.0, progress=False)
    b = dict(a, **{"lm_head.weight": a["lm_head.weight"][:3]})
    with pytest.raises(ValueError, match="shapes differ"):
        interpolation_curve(pico_model, a, b, lambda m: 0.0, progress=False)


# ------------------------------------------------------------------------------- displacement
def test_displacement_totals_groups_and_folders(pico_model, pico_pair, tmp_path):
    a = load_weights(pico_pair[0])
    a0 = load_weights(pico_model)
    d = displacement(a, a0)
    ref = sum(float((a[k].double() - a0[k].double()).pow(2).sum()) for k in a) ** 0.5
    assert d["total"] == pytest.approx(ref, rel=1e-12)
    assert set(d["per_layer"]) == {
        "model.embed_tokens",
        "model.layers.0",
        "model.layers.1",
        "model.norm",
        "lm_head",
    }
    layer0 = [v for k, v in d["per_tensor"].items() if k.startswith("model.layers.0.")]
    assert d["per_layer"]["model.layers.0"] == pytest.approx(np.linalg.norm(layer0), rel=1e-12)
    assert sum(v**2 for v in d["per_layer"].values()) == pytest.approx(d["total"] ** 2, rel=1e-12)
    # A saved folder (read tensor by tensor) is the same checkpoint as the model it came from.
    pico_pair[0].save_pretrained(tmp_path / "a")
    assert displacement(tmp_path / "a", pico_pair[0])["total"] == 0.0
    assert displacement(tmp_path / "a", pico_model)["total"] == pytest.approx(d["total"], rel=1e-12)
    half = {k: a0[k] + 0.5 * (a[k] - a0[k]) for k in a}
    assert displacement_ratio(a, half, a0) == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(ValueError, match="different tensors"):
        displacement({k: v for k, v in a.items() if k != "lm_head.weight"}, a0)
    with pytest.raises(ValueError, match="undefined"):
        displacement_ratio(a, a0, a0)


def test_norm_inequality_random_and_equal_checkpoints():
    rng = np.random.default_rng(0)
    theta0 = {"w": torch.tensor(rng.standard_normal((4, 3))), "b": torch.tensor(rng.normal(size=3))}
    thetas = [
        {k: v + torch.tensor(rng.normal(size=v.shape)) for k, v in theta0.items()} for _ in range(3)
    ]
    w = [0.2, 0.5, 0.3]
    out = norm_inequality(thetas, w, theta0)
    assert out["holds"] and out["lhs"] < out["rhs"]
    assert out["rhs"] - out["lhs"] == pytest.approx(out["spread"], rel=1e-10)
    deltas = stack_deltas(thetas, theta0)
    assert out["lhs"] == pytest.approx(float(np.sum((np.array(w) @ deltas) ** 2)), rel=1e-12)
    same = norm_inequality([thetas[0]] * 3, w, theta0)
    assert same["holds"] and same["lhs"] == pytest.approx(same["rhs"], rel=1e-12)
    assert same["spread"] < 1e-25  # θ̄ = Σ w_i θ equals θ up to rounding of Σ w_i
    with pytest.raises(ValueError, match="sum to 1"):
        norm_inequality(thetas, [0.5, 0.5, 0.5], theta0)


# ---------------------------------------------------------------------------------- flatness
def test_perturbation_sigma_zero_and_restoration(pico_model, loss_fn, one_thread):
    snap = snapshot(pico_model)
    table = perturbation_curve(pico_model, loss_fn, [0.0, 0.05], seeds=(0, 1), progress=False)
    assert_identical(pico_model, snap)
    assert list(table.columns) == ["sigma", "seed", "loss", "delta", "base_loss"]
    zero = table[table["sigma"] == 0.0]
    assert (zero["delta"] == 0.0).all() and (zero["loss"] == loss_fn(pico_model)).all()
    noisy = table[table["sigma"] == 0.05]
    assert (noisy["delta"] != 0.0).all()
    assert noisy["loss"].nunique() == 2  # different seeds, different draws
    again = perturbation_curve(pico_model, loss_fn, [0.05], seeds=(1,), progress=False)
    assert again["loss"].iloc[0] == noisy[noisy["seed"] == 1]["loss"].iloc[0]  # reproducible
    rel = perturbation_curve(pico_model, loss_fn, [0.0, 0.5], seeds=(0,), relative=True)
    assert rel["delta"].iloc[0] == 0.0 and rel["delta"].iloc[1] != 0.0
    assert_identical(pico_model, snap)
    summary = summarize_perturbation(table)
    assert list(summary.index) == [0.0, 0.05]
    assert summary.loc[0.0, "delta_mean"] == 0.0 and summary.loc[0.0, "delta_std"] == 0.0
    assert summary.loc[0.05, "delta_mean"] == pytest.approx(noisy["delta"].mean())
    with pytest.raises(ValueError, match="≥ 0"):
        perturbation_curve(pico_model, loss_fn, [-1.0], progress=False)


# --------------------------------------------------------------------------------- curvature
def test_response_loss_equals_heldout_loss(pico_model, demo_tokenizer):
    graph = make_loss_graph_fn(demo_tokenizer, EXAMPLES, max_length=64)
    value = graph(pico_model)
    assert value.requires_grad
    ref = heldout_loss(pico_model, demo_tokenizer, EXAMPLES, max_length=64)
    assert float(value.detach()) == pytest.approx(ref, rel=1e-6)


def test_hvp_matches_finite_difference_of_gradients(one_thread):
    model, loss = tiny_llama(), tiny_loss()
    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(1))
    v = v.double()
    hv = hvp(model, loss, None, v)

    def grad_at(shift: float) -> torch.Tensor:
        offsets = torch.split(v, [p.numel() for p in params])
        with torch.no_grad():
            for p, o in zip(params, offsets, strict=True):
                p.add_(shift * o.view_as(p))
        g = torch.autograd.grad(loss(model), params)
        with torch.no_grad():
            for p, o in zip(params, offsets, strict=True):
                p.sub_(shift * o.view_as(p))
        return torch.cat([x.reshape(-1) for x in g])

    eps = 1e-5
    fd = (grad_at(eps) - grad_at(-eps)) / (2 * eps)
    assert float((hv - fd).norm() / hv.norm()) < 1e-6
    # the curvature operator used by Lanczos gives the same product
    matvec, dim = build_curvature_matvec(model, loss)
    assert dim == v.numel() == 568
    np.testing.assert_allclose(matvec(v.numpy()), hv.numpy(), rtol=1e-10, atol=1e-12)


def test_lanczos_recovers_top_eigenvalues_of_an_explicit_matrix():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((60, 60)))
    lam = np.concatenate([[9.0, 7.0, 5.0], rng.uniform(-1, 1, 57)])
    a = (q * lam) @ q.T
    vals, vecs = lanczos_top_eigs(lambda x: a @ x, 60, k=3, n_iter=60, seed=1)
    np.testing.assert_allclose(vals, [9.0, 7.0, 5.0], rtol=1e-10)
    np.testing.assert_allclose(np.abs(vecs.T @ q[:, :3]), np.eye(3), atol=1e-8)


def test_lanczos_hessian_eigs_match_the_exact_hessian(one_thread):
    model, loss = tiny_llama(), tiny_loss()
    h = exact_hessian(model, loss)
    assert h.shape == (568, 568)
    np.testing.assert_allclose(h, h.T, atol=1e-10)
    exact = np.sort(np.linalg.eigvalsh(h))[::-1]
    spec = hessian_top_eigs(model, loss, k=3, n_iter=40, progress=False)
    np.testing.assert_allclose(spec.eigvals, exact[:3], rtol=1e-3)
    residual = h @ spec.eigvecs - spec.eigvecs * spec.eigvals
    assert np.linalg.norm(residual[:, 0]) < 1e-2 * exact[0]
    assert spec.names[0] == "model.embed_tokens.weight" and spec.shapes[0] == (VOCAB, 8)
    # a parameter subset, as select_parameters returns it: the sub-Hessian's eigenvalues
    mlp = select_parameters(model, include=["*.mlp.*"])
    sub = exact_hessian(model, loss, mlp)
    assert sub.shape == (192, 192)
    spec = hessian_top_eigs(model, loss, mlp, k=3, n_iter=40, progress=False)
    np.testing.assert_allclose(spec.eigvals, np.linalg.eigvalsh(sub)[::-1][:3], rtol=1e-3)
    with pytest.raises(ValueError, match="tiny models"):
        exact_hessian(model, loss, max_dim=100)


def test_gauss_newton_matvec_equals_explicit_jt_h_j(one_thread):
    model, loss = tiny_llama(), tiny_loss()
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def logits_of(flat):
        chunks = torch.split(flat, [p.numel() for p in params])
        state = {n: c.view_as(p) for n, c, p in zip(names, chunks, params, strict=True)}
        return torch.func.functional_call(model, state, (), {"input_ids": ids}).logits

    ids = loss.batch["input_ids"]
    keep = (loss.batch["labels"][:, 1:] != IGNORE_INDEX).reshape(-1)

    def labelled_logits(flat):
        z = logits_of(flat)[:, :-1].reshape(-1, VOCAB)
        return z[keep].reshape(-1)

    jac = torch.autograd.functional.jacobian(
        labelled_logits, flat0, vectorize=True
    ).numpy()  # (n·V, dim)
    n = int(keep.sum())
    p = torch.softmax(labelled_logits(flat0).view(n, VOCAB), -1).numpy()
    h_out = np.zeros((n * VOCAB, n * VOCAB))
    for t in range(n):
        h_out[t * VOCAB : (t + 1) * VOCAB, t * VOCAB : (t + 1) * VOCAB] = (
            np.diag(p[t]) - np.outer(p[t], p[t])
        ) / n
    ggn = jac.T @ h_out @ jac
    matvec, dim = build_curvature_matvec(model, loss, mode="gauss_newton")
    v = np.random.default_rng(0).standard_normal(dim)
    np.testing.assert_allclose(matvec(v), ggn @ v, rtol=1e-8, atol=1e-12)
    spec = hessian_top_eigs(model, loss, k=2, n_iter=40, mode="gauss_newton", progress=False)
    np.testing.assert_allclose(spec.eigvals, np.linalg.eigvalsh(ggn)[::-1][:2], rtol=1e-6)
    with pytest.raises(ValueError, match="logits_and_labels"):
        build_curvature_matvec(model, lambda m: loss(m), mode="gauss_newton")


# ------------------------------------------------------------------------------------ theory
def random_quadratic(d: int, seed: int):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d))
    h = a @ a.T + 0.1 * np.eye(d)
    star, c = rng.standard_normal(d), 0.7

    def loss(theta):
        return 0.5 * (theta - star) @ h @ (theta - star) + c

    return rng, h, loss


def test_merging_gain_equals_quadratic_prediction_exactly():
    rng, h, loss = random_quadratic(12, seed=3)
    theta0 = rng.standard_normal(12)
    thetas = theta0 + rng.standard_normal((4, 12))
    w = rng.dirichlet(np.ones(4))
    merged = w @ thetas
    gain = merging_gain([loss(t) for t in thetas], w, loss(merged))
    direct = 0.5 * sum(
        wi * (t - merged) @ h @ (t - merged) for wi, t in zip(w, thetas, strict=True)
    )
    assert gain == pytest.approx(direct, rel=1e-12)
    lam, u = np.linalg.eigh(h)
    pred = quadratic_gain_prediction(thetas - theta0, w, lam, u)
    assert abs(pred["gain"] - gain) < 1e-8
    assert pred["gain"] > 0 and pred["explained"] == pytest.approx(1.0, rel=1e-12)
    assert pred["per_direction"].sum() == pytest.approx(pred["gain"], rel=1e-12)
    top = quadratic_gain_prediction(thetas - theta0, w, lam[-3:], u[:, -3:])
    assert 0 < top["gain"] < pred["gain"] and 0 < top["explained"] < 1
    filt = spectral_filtering(thetas - theta0, w, u, eigvals=lam)
    np.testing.assert_allclose(
        filt["branch_energy"] - filt["merged_energy"], pred["variance"], rtol=1e-9, atol=1e-12
    )
    assert (filt["kept"].between(0, 1)).all() and list(filt.columns)[:2] == ["direction", "eigval"]
    with pytest.raises(ValueError, match="sum to 1"):
        merging_gain([1.0, 2.0], [0.7, 0.7], 1.0)


@pytest.fixture
def partition_rows():
    rng = np.random.default_rng(5)
    names = [f"s{i}" for i in range(6)]
    rows = rng.standard_normal((6, 10))
    tokens = {s: int(t) for s, t in zip(names, rng.integers(10, 100, 6), strict=True)}
    part = Partition(
        method="manual",
        groups=(("s0", "s3"), ("s1", "s4", "s5"), ("s2",)),
        examples=dict.fromkeys(names, 5),
        tokens=tokens,
    )
    return rng, names, rows, part


def test_predicted_partition_gain_identity_equals_predict_gain(partition_rows):
    _, names, rows, part = partition_rows
    for eta in (1.0, 0.3):
        ref = predict_gain(part, rows, names, eta)
        assert predicted_partition_gain(part, rows, names, eta) == pytest.approx(ref, rel=1e-12)
        assert predicted_partition_gain(
            part, rows, names, eta, curvature="diag", diag=np.ones(10)
        ) == pytest.approx(ref, rel=1e-12)
    ref = predict_gain(part, rows, names, normalize=True)
    assert predicted_partition_gain(part, rows, names, normalize=True) == pytest.approx(ref)


def test_predicted_partition_gain_with_curvature(partition_rows):
    rng, names, rows, part = partition_rows
    a = rng.standard_normal((10, 10))
    h = a @ a.T
    lam, u = np.linalg.eigh(h)
    eta = 0.5
    sub = predicted_partition_gain(part, rows, names, eta, "subspace", eigvals=lam, eigvecs=u)
    means = group_means(part, rows, names)
    w = np.array(part.weights)
    dev = means - w @ means
    dense = 0.5 * eta**2 * sum(wk * dk @ h @ dk for wk, dk in zip(w, dev, strict=True))
    assert sub == pytest.approx(dense, rel=1e-10)
    # δ_k = −η ḡ_k: the same number as the quadratic-theory prediction on those displacements
    pred = quadratic_gain_prediction(-eta * means, w, lam, u)
    assert sub == pytest.approx(pred["gain"], rel=1e-10)
    d = rng.uniform(0.1, 2.0, 10)
    diag = predicted_partition_gain(part, rows, names, eta, "diag", diag=d)
    assert diag == pytest.approx(0.5 * eta**2 * float(w @ (dev**2 @ d)), rel=1e-12)
    # K = 2 with equal weights: the paper's η²/8 (ḡ1 − ḡ2)ᵀ H (ḡ1 − ḡ2)
    two = Partition(
        method="manual",
        groups=(("s0", "s1", "s2"), ("s3", "s4", "s5")),
        examples=dict.fromkeys(names, 5),
        tokens=dict.fromkeys(names, 10),
    )
    g1, g2 = group_means(two, rows, names)
    paper = eta**2 / 8 * (g1 - g2) @ h @ (g1 - g2)
    got = predicted_partition_gain(two, rows, names, eta, "subspace", eigvals=lam, eigvecs=u)
    assert got == pytest.approx(paper, rel=1e-10)
    with pytest.raises(ValueError, match="needs eigvals"):
        predicted_partition_gain(two, rows, names, curvature="subspace")
    with pytest.raises(ValueError, match="curvature must be"):
        predicted_partition_gain(two, rows, names, curvature="full")


# ------------------------------------------------------------------------------------ figures
def test_diagnostic_figures_carry_the_numbers():
    from merit_lab.viz.plots_diagnostics import (
        plot_displacement,
        plot_interpolation,
        plot_perturbation,
        plot_spectral_filtering,
    )

    curve = {
        "alphas": np.array([0.0, 0.5, 1.0]),
        "losses": np.array([1.0, 1.2, 2.0]),
        "excess": np.array([0.0, -0.3, 0.0]),
        "barrier": 0.0,
        "loss_a": 1.0,
        "loss_b": 2.0,
    }
    fig = plot_interpolation({"a→b": curve})
    drawn = [t for t in fig.data if t.x is not None and None not in tuple(t.x)]
    assert list(drawn[0].y) == [1.0, 1.2, 2.0]  # the path
    assert len(drawn) == 2 and list(drawn[1].y) == [1.0, 1.5, 2.0]  # its chord
    # one legend-only entry explains the dotted chords
    assert [t.name for t in fig.data if t not in drawn] == ["chord (endpoints joined)"]
    d = {"total": 5.0, "per_tensor": {}, "per_layer": {"model.layers.0": 3.0, "lm_head": 4.0}}
    fig = plot_displacement({"joint": d, "merged": d})
    assert [t.name for t in fig.data] == ["joint (total 5)", "merged (total 5)"]
    assert list(fig.data[0].y) == [3.0, 4.0]
    table = pd.DataFrame(
        {"sigma": [0.0, 0.1, 0.1], "seed": [0, 0, 1], "loss": [1.0, 1.2, 1.4]}
    ).assign(delta=lambda t: t["loss"] - 1.0, base_loss=1.0)
    fig = plot_perturbation({"merged": table})
    assert list(fig.data[0].y) == pytest.approx([0.0, 0.3])
    filt = spectral_filtering(np.eye(2), [0.5, 0.5], np.eye(2), eigvals=[2.0, 1.0])
    fig = plot_spectral_filtering(filt)
    assert list(fig.data[0].y) == [0.5, 0.5] and list(fig.data[1].y) == [0.25, 0.25]
