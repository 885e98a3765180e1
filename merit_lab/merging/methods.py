"""Merge methods: a registry of small pure functions over tensors, one each (mergekit's style).

Input: the K inputs' float32 values of one parameter, their weights and θ0's value. Output: the
merged value. `merge_method` registers a function with its reference, whether it needs θ0 and
its weight rule; `merit_lab.merging.stream.merge_checkpoints` applies one tensor by tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import Tensor

__all__ = [
    "MERGE_METHODS",
    "MergeMethod",
    "merge_linear",
    "merge_method",
    "merge_task_arithmetic",
    "merge_ties",
    "merge_uniform",
]

Tensors = Sequence[Tensor]  # the K inputs' values of one parameter, float32, same shape


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: ``fn(tensors, weights, base, **params) -> tensor``.

    ``tensors`` are the K inputs' values of one parameter (float32, same shape); ``base`` is
    θ0's value (float32) or None. ``defaults`` uses mergekit's parameter names.
    """

    name: str
    fn: Callable[..., Tensor]
    reference_url: str
    needs_base: bool  # task-vector methods subtract θ0
    weight_rule: str  # "convex": ≥ 0 and sum 1; "equal": takes no weights; "free": any finite
    defaults: Mapping[str, float] = field(default_factory=dict)
    # each output entry is a function of the inputs' entries at the same place, through + − ×
    # alone: the merge may go in slices of a tensor (same bits), and a NaN/inf in any input
    # reaches the output, so checking the output finds it (`merit_lab.merging.engine`)
    elementwise: bool = False

    def check_weights(self, weights: Sequence[float] | None, k: int) -> list[float]:
        """The K weights this method merges with: ``weights`` checked against its rule, or its
        default (equal shares for ``convex``/``equal``, 1 each for ``free``)."""
        if self.weight_rule == "equal":
            if weights is not None:
                raise ValueError(f"method {self.name!r} takes no weights; use method='linear'")
            return [1.0 / k] * k
        if weights is None:
            return [1.0 / k] * k if self.weight_rule == "convex" else [1.0] * k
        w = [float(x) for x in weights]
        if len(w) != k:
            raise ValueError(f"got {len(w)} weights for {k} inputs")
        if not all(map(math.isfinite, w)):
            raise ValueError(f"weights must be finite, got {w}")
        if self.weight_rule == "convex" and (min(w) < 0 or abs(sum(w) - 1.0) > 1e-6):
            raise ValueError(f"method {self.name!r} needs weights >= 0 summing to 1, got {w}")
        return w

    def check_params(self, params: Mapping[str, float] | None) -> dict[str, float]:
        """Its parameters (mergekit's names): ``params`` over `defaults`, checked."""
        params = dict(params or {})
        if unknown := sorted(set(params) - set(self.defaults)):
            raise ValueError(f"method {self.name!r} takes {sorted(self.defaults)}, not {unknown}")
        out = {k: float(params.get(k, v)) for k, v in self.defaults.items()}
        if not all(map(math.isfinite, out.values())):
            raise ValueError(f"parameters must be finite, got {out}")
        if not 0.0 < out.get("density", 1.0) <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {out['density']}")
        return out


MERGE_METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    reference_url: str,
    needs_base: bool = False,
    weight_rule: str = "free",
    defaults: Mapping[str, float] | None = None,
    elementwise: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register the decorated function in `MERGE_METHODS` under ``name``."""

    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        frozen = MappingProxyType(dict(defaults or {}))
        MERGE_METHODS[name] = MergeMethod(
            name, fn, reference_url, needs_base, weight_rule, frozen, elementwise
        )
        return fn

    return register


@merge_method(
    "linear",
    reference_url="https://arxiv.org/abs/2203.05482",
    weight_rule="convex",
    elementwise=True,
)
def merge_linear(
    tensors: Tensors,
    weights: Sequence[float],
    base: Tensor | None = None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """θ̄ = Σ_k w_k θ_k: MERIT's merge when w_k = N_k / Σ_j N_j (token shares).

    ``out``: a float32 tensor of the inputs' shape to write θ̄ into (else a new one).
    """
    out = torch.mul(tensors[0], weights[0], out=out)
    for t, w in zip(tensors[1:], weights[1:], strict=True):
        out.add_(t, alpha=w)
    return out


@merge_method(
    "uniform",
    reference_url="https://arxiv.org/abs/2203.05482",
    weight_rule="equal",
    elementwise=True,
)
def merge_uniform(
    tensors: Tensors,
    weights: Sequence[float],
    base: Tensor | None = None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Model soup: θ̄ = (1/K) Σ_k θ_k (``weights`` is ignored)."""
    return merge_linear(tensors, [1.0 / len(tensors)] * len(tensors), out=out)


@merge_method(
    "task_arithmetic",
    reference_url="https://arxiv.org/abs/2212.04089",
    needs_base=True,
    defaults={"lambda": 1.0},
    elementwise=True,
)
def merge_task_arithmetic(
    tensors: Tensors, weights: Sequence[float], base: Tensor, lambda_: float = 1.0
) -> Tensor:
    """θ0 + λ Σ_k w_k (θ_k − θ0), as mergekit's ``task_arithmetic`` (normalize off)."""
    delta = torch.zeros_like(base)
    for t, w in zip(tensors, weights, strict=True):
        delta.add_(t - base, alpha=w)
    return base + lambda_ * delta


@merge_method(
    "ties",
    reference_url="https://arxiv.org/abs/2306.01708",
    needs_base=True,
    defaults={"density": 1.0, "lambda": 1.0},
)
def merge_ties(
    tensors: Tensors,
    weights: Sequence[float],
    base: Tensor,
    density: float = 1.0,
    lambda_: float = 1.0,
) -> Tensor:
    """TIES as mergekit does it (per tensor, ``normalize: true``, consensus by sum).

    Trim each task vector δ_k = θ_k − θ0 to its ``int(density · numel)`` largest |entries|;
    elect the sign of Σ_k w_k δ̂_k (a zero sum counts as +); average the entries w_k δ̂_k whose
    sign agrees, dividing by the sum of their w_k (disjoint mean); return θ0 + λ · that.
    """
    weighted = []
    for t, w in zip(tensors, weights, strict=True):
        delta = (t - base).flatten()
        k = int(density * delta.numel())
        if k < delta.numel():
            keep = torch.zeros_like(delta, dtype=torch.bool)
            keep[torch.topk(delta.abs(), k, sorted=False).indices] = True
            delta = torch.where(keep, delta, 0.0)
        weighted.append(delta * w)
    elected = torch.where(sum(weighted) >= 0, 1.0, -1.0)
    num, den = torch.zeros_like(elected), torch.zeros_like(elected)
    for wd, w in zip(weighted, weights, strict=True):
        agree = torch.sign(wd) == elected  # trimmed (zero) entries never agree
        num += torch.where(agree, wd, 0.0)
        den += agree * w
    den[den == 0] = 1.0
    return base + lambda_ * (num / den).view_as(base)
