"""Curvature: Hessian- and Gauss-Newton-vector products, Lanczos eigenpairs, exact Hessians.

Input: a model at its current weights and a differentiable loss ``f(model) -> scalar tensor``
(a `merit_lab.diagnostics.ResponseLoss` for Gauss-Newton, which needs the logits). Output: the
top-k eigenvalues and eigenvectors over the flat parameter vector (`CurvatureSpectrum`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "CurvatureSpectrum",
    "build_curvature_matvec",
    "exact_hessian",
    "hessian_top_eigs",
    "hvp",
    "lanczos_top_eigs",
]

LossGraphFn = Callable[[torch.nn.Module], Tensor]


def _resolve_params(model: torch.nn.Module, params) -> tuple[list[str], list[Tensor]]:
    """(names, tensors): all trainable parameters, or the given tensors / (name, tensor) pairs."""
    if params is None:
        pairs = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    else:
        lookup = {id(p): n for n, p in model.named_parameters()}
        pairs = [
            (p[0], p[1]) if isinstance(p, tuple) else (lookup.get(id(p), f"param{i}"), p)
            for i, p in enumerate(params)
        ]
    if not pairs:
        raise ValueError("no parameters to differentiate")
    for n, p in pairs:
        if not p.requires_grad:
            raise ValueError(f"parameter {n!r} does not require grad")
    return [n for n, _ in pairs], [p for _, p in pairs]


def _math_sdpa():
    """Attention through the math kernel: fused SDPA kernels have no double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _split(v: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for p in params:
        out.append(v[i : i + p.numel()].view_as(p))
        i += p.numel()
    if i != v.numel():
        raise ValueError(f"vector of length {v.numel()} for {i} parameters")
    return out


def _flat(ts: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    return torch.cat(
        [
            (t if t is not None else torch.zeros_like(p)).reshape(-1)
            for t, p in zip(ts, params, strict=True)
        ]
    )


def build_curvature_matvec(
    model: torch.nn.Module,
    loss_graph_fn: LossGraphFn,
    params=None,
    mode: str = "hessian",
) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    """A curvature-vector product at the model's current weights, one graph reused per product.

    ``mode="hessian"``: Hv by double backprop through ∇L. ``mode="gauss_newton"``: the GGN
    Jᵀ H_out J v of mean cross-entropy, with H_out = (diag(p) − ppᵀ)/n per labelled token and J
    the Jacobian of the logits; Jv comes from the double-vjp trick (no forward-mode AD needed).
    Gauss-Newton needs ``loss_graph_fn.logits_and_labels(model)`` (see `ResponseLoss`).

    Args:
        params: parameters to differentiate: tensors or (name, tensor) pairs; default all
            trainable ones.

    Returns:
        (matvec, dim): ``matvec(v)`` maps a (dim,) float64 array to a (dim,) float64 array.
    """
    _, ps = _resolve_params(model, params)
    dim = sum(p.numel() for p in ps)

    def to_torch(v: np.ndarray) -> list[Tensor]:
        v = np.asarray(v, dtype=np.float64)
        if v.shape != (dim,):
            raise ValueError(f"expected a ({dim},) vector, got {v.shape}")
        chunks = _split(torch.as_tensor(v), ps)  # per parameter: models may span devices
        return [c.to(p.device, p.dtype) for c, p in zip(chunks, ps, strict=True)]

    def to_numpy(ts) -> np.ndarray:
        return np.concatenate(
            [
                t.detach().to("cpu", torch.float64).reshape(-1).numpy()
                if t is not None
                else np.zeros(p.numel())
                for t, p in zip(ts, ps, strict=True)
            ]
        )

    if mode == "hessian":
        with torch.enable_grad(), _math_sdpa():
            loss = loss_graph_fn(model)
            _check_loss(loss)
            grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

        def matvec(v: np.ndarray) -> np.ndarray:
            vs = to_torch(v)
            out: list[Tensor | None] = [None] * len(ps)
            if live:
                hv = torch.autograd.grad(
                    [grads[i] for i in live],
                    ps,
                    [vs[i] for i in live],
                    retain_graph=True,
                    allow_unused=True,
                )
                out = list(hv)
            return to_numpy(out)

        return matvec, dim
    if mode != "gauss_newton":
        raise ValueError(f"mode must be 'hessian' or 'gauss_newton', got {mode!r}")
    logits_fn = getattr(loss_graph_fn, "logits_and_labels", None)
    if logits_fn is None:
        raise ValueError("gauss_newton needs loss_graph_fn.logits_and_labels (use ResponseLoss)")
    with torch.enable_grad(), _math_sdpa():
        logits, _ = logits_fn(model)
        if logits.shape[0] == 0:
            raise ValueError("no labelled tokens: the Gauss-Newton matrix is empty")
        probs = torch.softmax(logits.detach().double(), dim=-1)
        dummy = torch.zeros_like(logits, requires_grad=True)
        jt_dummy = torch.autograd.grad(logits, ps, dummy, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(jt_dummy) if g is not None and g.requires_grad]
    n = logits.shape[0]

    def ggn_matvec(v: np.ndarray) -> np.ndarray:
        vs = to_torch(v)
        if not live:
            return np.zeros(dim)
        (jv,) = torch.autograd.grad(
            [jt_dummy[i] for i in live], dummy, [vs[i] for i in live], retain_graph=True
        )
        jv = jv.double()
        hjv = (probs * jv - probs * (probs * jv).sum(-1, keepdim=True)) / n
        out = torch.autograd.grad(
            logits, ps, hjv.to(logits.dtype), retain_graph=True, allow_unused=True
        )
        return to_numpy(out)

    return ggn_matvec, dim


def _check_loss(loss: Tensor) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError("loss_graph_fn must return a differentiable scalar tensor")
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"loss_graph_fn returned a non-finite loss ({float(loss)})")


def hvp(
    model: torch.nn.Module, loss_fn_graph: LossGraphFn, params, v: Tensor | Sequence[Tensor]
) -> Tensor:
    """One Hessian-vector product Hv at the model's current weights, by double backprop.

    Args:
        params: tensors or (name, tensor) pairs; None = all trainable parameters.
        v: a flat (dim,) tensor, or one tensor per parameter.

    Returns:
        (dim,) flat Hv in the parameters' dtype.
    """
    _, ps = _resolve_params(model, params)
    if isinstance(v, Tensor):
        vs = _split(v.reshape(-1), ps)
    else:
        vs = list(v)
        if [t.shape for t in vs] != [p.shape for p in ps]:
            raise ValueError("v's tensors do not match the parameters' shapes")
    with torch.enable_grad(), _math_sdpa():
        loss = loss_fn_graph(model)
        _check_loss(loss)
        grads = torch.autograd.grad(loss, ps, create_graph=True, materialize_grads=True)
        dot = sum((g * t.to(g.dtype)).sum() for g, t in zip(grads, vs, strict=True))
        out = torch.autograd.grad(dot, ps, allow_unused=True)
    return _flat(out, ps).detach()


def lanczos_top_eigs(
    matvec: Callable[[np.ndarray], np.ndarray],
    dim: int,
    k: int = 5,
    n_iter: int = 30,
    seed: int = 0,
    *,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (largest algebraic) eigenpairs of a symmetric operator by Lanczos.

    Every new Lanczos vector is re-orthogonalised against all previous ones (twice), so Ritz
    values do not duplicate; memory is n_iter × dim float64. Stops early when the Krylov space
    is invariant (then the Ritz pairs are exact).

    Args:
        matvec: v (dim,) float64 → Av (dim,).
        n_iter: Krylov dimension (capped at dim); must be ≥ k.

    Returns:
        (eigvals (k,) descending, eigvecs (dim, k) float64 orthonormal columns).
    """
    if not 1 <= k <= dim:
        raise ValueError(f"k must be in [1, dim={dim}], got {k}")
    m = min(int(n_iter), dim)
    if m < k:
        raise ValueError(f"n_iter={n_iter} < k={k}")
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(dim)
    q /= np.linalg.norm(q)
    basis = np.zeros((m, dim))
    alpha, beta = np.zeros(m), np.zeros(m)
    used = m
    for j in tqdm(range(m), desc="lanczos", unit="matvec", disable=not progress):
        basis[j] = q
        w = np.asarray(matvec(q), dtype=np.float64)
        if not np.isfinite(w).all():
            raise ValueError(f"matvec returned non-finite values at iteration {j}")
        alpha[j] = q @ w
        for _ in range(2):
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta[j] = np.linalg.norm(w)
        scale = max(abs(alpha[: j + 1]).max(), beta[: j + 1].max(), 1e-300)
        if j + 1 < m and beta[j] <= 1e-10 * scale:
            used = j + 1
            break
        if j + 1 < m:
            q = w / beta[j]
    if used < k:
        raise ValueError(f"the Krylov space became invariant after {used} < k={k} steps")
    t = np.diag(alpha[:used]) + np.diag(beta[: used - 1], 1) + np.diag(beta[: used - 1], -1)
    evals, evecs = np.linalg.eigh(t)
    top = np.argsort(evals)[::-1][:k]
    return evals[top], basis[:used].T @ evecs[:, top]


@dataclass(frozen=True)
class CurvatureSpectrum:
    """Top eigenpairs of the Hessian (or Gauss-Newton matrix) over a flat parameter vector.

    Attributes:
        eigvals: (k,) float64, descending.
        eigvecs: (dim, k) float64 orthonormal columns, parameters flattened in ``names`` order.
        mode: "hessian" | "gauss_newton".
        names, shapes: the parameters the flat vector concatenates.
    """

    eigvals: np.ndarray
    eigvecs: np.ndarray
    mode: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]


def hessian_top_eigs(
    model: torch.nn.Module,
    loss_graph_fn: LossGraphFn,
    params=None,
    k: int = 5,
    n_iter: int = 30,
    mode: str = "hessian",
    seed: int = 0,
    *,
    progress: bool = True,
) -> CurvatureSpectrum:
    """Top-k curvature eigenpairs at the model's current weights (Lanczos, n_iter products).

    Args:
        loss_graph_fn: ``f(model) -> scalar tensor`` with a graph; for ``gauss_newton`` a
            `ResponseLoss` (it needs the logits).
        params: tensors or (name, tensor) pairs; None = all trainable parameters.
        mode: "hessian" (indefinite, exact curvature) or "gauss_newton" (PSD GGN / Fisher).
    """
    names, ps = _resolve_params(model, params)
    matvec, dim = build_curvature_matvec(model, loss_graph_fn, ps, mode)
    vals, vecs = lanczos_top_eigs(matvec, dim, k, n_iter, seed, progress=progress)
    return CurvatureSpectrum(vals, vecs, mode, tuple(names), tuple(tuple(p.shape) for p in ps))


def exact_hessian(
    model: torch.nn.Module, loss_graph_fn: LossGraphFn, params=None, *, max_dim: int = 5000
) -> np.ndarray:
    """The full Hessian (dim, dim) float64 by torch.autograd.functional.hessian (tiny models).

    The parameters are swapped for a flat vector with ``torch.func.functional_call``, so this
    shares no code with `hvp` and can check it. Raises ValueError past ``max_dim``.
    """
    names, ps = _resolve_params(model, params)
    dim = sum(p.numel() for p in ps)
    if dim > max_dim:
        raise ValueError(f"{dim} parameters: an exact Hessian is for tiny models (≤ {max_dim})")
    unknown = sorted(set(names) - {n for n, _ in model.named_parameters()})
    if unknown:
        raise ValueError(f"not parameters of the model (pass (name, tensor) pairs): {unknown}")

    class _Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self) -> Tensor:
            return loss_graph_fn(self.inner)

    wrap = _Wrap()

    def f(flat: Tensor) -> Tensor:
        tensors = _split(flat, ps)
        return torch.func.functional_call(
            wrap, {f"inner.{n}": t for n, t in zip(names, tensors, strict=True)}, ()
        )

    flat0 = torch.cat([p.detach().reshape(-1) for p in ps])
    with _math_sdpa():
        try:  # vmap over the backward passes: faster, but not every op has a batching rule
            h = torch.autograd.functional.hessian(f, flat0, vectorize=True)
        except RuntimeError:
            h = torch.autograd.functional.hessian(f, flat0)
    return h.detach().to("cpu", torch.float64).numpy()
