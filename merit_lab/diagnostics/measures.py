"""Merge-readiness diagnostics: is θ0 a flat basin where averaging branches pays off?

Input: a model, checkpoints (state dicts, models or HF safetensors folders) and a loss function.
Output: loss along linear paths (barriers), distances to θ0 and the norm inequality, and loss
under Gaussian weight noise.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from merit_lab.config.schema import EvalConfig, TrainConfig
from merit_lab.data.formatting import (
    collate,
    count_response_tokens,
    response_logits,
    response_token_loss,
    tokenize_examples,
)
from merit_lab.data.multimodal import in_model_names
from merit_lab.models.checkpoints import Checkpoint
from merit_lab.partition.gain import as_matrix, check_weights

__all__ = [
    "LossFn",
    "LossGraphFn",
    "ResponseLoss",
    "Weights",
    "as_weights",
    "displacement",
    "displacement_ratio",
    "float_tensors",
    "interpolation_curve",
    "load_weights",
    "make_loss_fn",
    "make_loss_graph_fn",
    "norm_inequality",
    "perturbation_curve",
    "stack_deltas",
    "summarize_perturbation",
]

Weights = Mapping[str, Tensor] | torch.nn.Module | str | Path  # a state dict, a model or a folder
LossFn = Callable[[torch.nn.Module], float]
LossGraphFn = Callable[[torch.nn.Module], Tensor]
_LAYER = re.compile(r"^(.*?layers\.\d+)\.")


# ------------------------------------------------------------------------------ weights, losses
class _Lazy(Mapping):
    """Read-only name → tensor view of an HF safetensors folder, one tensor read per lookup."""

    def __init__(self, folder: Path) -> None:
        self._ckpt = Checkpoint.open(Path(folder))

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._ckpt.tensors:
            raise KeyError(key)
        return self._ckpt.read(key)

    def __iter__(self):
        return iter(self._ckpt.tensors)

    def __len__(self) -> int:
        return len(self._ckpt.tensors)


def as_weights(theta: Weights) -> Mapping[str, Tensor]:
    """Model → its parameters (tied ones once); folder → a lazy view; mapping → itself."""
    if isinstance(theta, torch.nn.Module):
        return {n: p.detach() for n, p in theta.named_parameters()}
    if isinstance(theta, (str, Path)):  # under the loaded model's names (Qwen2-VL renames)
        return in_model_names(_Lazy(Path(theta)), theta)
    return theta


def load_weights(theta: Weights) -> dict[str, Tensor]:
    """Materialise weights as a plain CPU state dict (floating-point tensors only, cloned).

    Args:
        theta: a state dict, a model (its parameters, tied ones once) or an HF safetensors folder.
    """
    src = as_weights(theta)
    out = {k: src[k].detach().to("cpu").clone() for k in src}
    return {k: v for k, v in out.items() if v.is_floating_point()}


def _check_finite(t: Tensor, what: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} has NaN or infinite values")


def _float_keys(m: Mapping[str, Tensor]) -> list[str]:
    if isinstance(m, _Lazy):  # dtype from the header: no tensor read
        return m._ckpt.float_keys()
    return [k for k in m if m[k].is_floating_point()]


def _check_same_keys(named: Mapping[str, Mapping[str, Tensor]]) -> list[str]:
    """The floating-point keys shared by several state dicts; ValueError naming any mismatch."""
    (ref_name, ref), *others = named.items()
    keys = _float_keys(ref)
    for name, other in others:
        other_keys = set(_float_keys(other))
        missing, extra = sorted(set(keys) - other_keys), sorted(other_keys - set(keys))
        if missing or extra:
            raise ValueError(
                f"{name} and {ref_name} hold different tensors: missing {missing[:5]}, "
                f"extra {extra[:5]} (first 5 of each)"
            )
    return keys


def make_loss_fn(
    tokenizer,
    examples: Sequence[dict],
    max_length: int = TrainConfig.max_length,
    batch_size: int = EvalConfig.batch_size,
) -> LossFn:
    """``loss_fn(model) -> float``: mean response-token cross-entropy on ``examples``.

    The value is `heldout_loss`'s; the examples are tokenised and collated once, not per call
    (a diagnostic evaluates the same examples at hundreds of weight settings).
    """
    toks = tokenize_examples(tokenizer, list(examples), max_length)
    if not toks:
        raise ValueError("make_loss_fn needs at least one example")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [collate(toks[i : i + batch_size], pad) for i in range(0, len(toks), batch_size)]
    count = max(sum(count_response_tokens(b["labels"]) for b in batches), 1)

    @torch.no_grad()
    def loss_fn(model: torch.nn.Module) -> float:
        return float(sum(float(response_token_loss(model, b, num_items=count)) for b in batches))

    return loss_fn


class ResponseLoss:
    """Differentiable mean response-token cross-entropy on one fixed batch.

    ``loss(model)`` is a scalar tensor with a graph (for Hessian-vector products);
    ``loss.logits_and_labels(model)`` gives the labelled positions' logits (n, V) and labels (n,)
    for the Gauss-Newton product. On a `collate` batch the value equals `heldout_loss`.

    Args:
        batch: ``input_ids``, ``attention_mask`` and ``labels`` (B, L) int64, -100 = no loss;
            labels are shifted inside (position t predicts token t+1), as in `heldout_loss`.
    """

    def __init__(self, batch: Mapping[str, Tensor]) -> None:
        missing = {"input_ids", "attention_mask", "labels"} - set(batch)
        if missing:
            raise ValueError(f"batch lacks {sorted(missing)}")
        if count_response_tokens(batch["labels"]) == 0:
            raise ValueError("batch has no labelled token to score")
        self.batch = dict(batch)

    def logits_and_labels(self, model: torch.nn.Module) -> tuple[Tensor, Tensor]:
        """The labelled positions' logits (n, V) and labels (n,) (`response_logits`)."""
        return response_logits(model, self.batch)

    def __call__(self, model: torch.nn.Module) -> Tensor:
        return response_token_loss(model, self.batch)


def make_loss_graph_fn(
    tokenizer, examples: Sequence[dict], max_length: int = TrainConfig.max_length
) -> ResponseLoss:
    """A differentiable ``loss_graph_fn(model) -> Tensor`` on ``examples``, all in one batch."""
    toks = tokenize_examples(tokenizer, list(examples), max_length)
    if not toks:
        raise ValueError("make_loss_graph_fn needs at least one example")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return ResponseLoss(collate(toks, pad))


def float_tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    """Every floating-point parameter and buffer of the model, by state-dict name (tied: each)."""
    sd = model.state_dict(keep_vars=True)
    return {k: v for k, v in sd.items() if v.is_floating_point()}


# ------------------------------------------------------------------------ linear interpolation
def interpolation_curve(
    model: torch.nn.Module,
    theta_a: Weights,
    theta_b: Weights,
    loss_fn: LossFn,
    alphas: Sequence[float] | np.ndarray | None = None,
    *,
    progress: bool = True,
) -> dict:
    """Loss along the straight line (1−α)θ_a + αθ_b, written into ``model`` in place.

    Every tensor of θ_a/θ_b is overwritten in the model (no reload per point); model tensors
    that θ_a does not name keep their values. The model's weights are restored bit-identically
    afterwards, also when ``loss_fn`` raises.

    Args:
        model: a model with the same architecture as the checkpoints.
        theta_a, theta_b: state dicts (or models, or safetensors folders) with identical keys and
            shapes; all keys must be floating-point tensors of the model.
        loss_fn: ``loss_fn(model) -> float``, e.g. `make_loss_fn`.
        alphas: (P,) interpolation coefficients; default ``np.linspace(0, 1, 11)``. The barrier
            uses the losses at α = 0 and α = 1, which are evaluated even if not listed.

    Returns:
        dict with ``alphas`` (P,), ``losses`` (P,), ``excess`` (P,) = L(α) − [(1−α)L(0) + αL(1)],
        ``barrier`` = max(0, max_α excess), ``loss_a`` = L(0) and ``loss_b`` = L(1).
    """
    alphas = np.linspace(0.0, 1.0, 11) if alphas is None else np.asarray(alphas, dtype=np.float64)
    if alphas.ndim != 1 or alphas.size == 0 or not np.isfinite(alphas).all():
        raise ValueError(f"alphas must be a non-empty 1-D finite sequence, got {alphas!r}")
    a, b = load_weights(theta_a), load_weights(theta_b)
    keys = _check_same_keys({"theta_a": a, "theta_b": b})
    target = float_tensors(model)
    unknown = [k for k in keys if k not in target]
    if unknown:
        raise ValueError(f"tensors not in the model: {unknown[:5]} (first 5)")
    for k in keys:
        if a[k].shape != b[k].shape or a[k].shape != target[k].shape:
            raise ValueError(
                f"{k}: shapes differ: theta_a {tuple(a[k].shape)}, theta_b {tuple(b[k].shape)}, "
                f"model {tuple(target[k].shape)}"
            )
        _check_finite(a[k], f"theta_a[{k!r}]")
        _check_finite(b[k], f"theta_b[{k!r}]")
    # Interpolate in at least float32 (float64 models stay exact at the endpoints).
    dt = {k: torch.promote_types(target[k].dtype, torch.float32) for k in keys}
    a = {k: a[k].to(target[k].device, dt[k]) for k in keys}
    b = {k: b[k].to(target[k].device, dt[k]) for k in keys}
    losses = {}
    points = sorted({0.0, 1.0, *alphas.tolist()})
    with _restored(model, keys):
        for alpha in tqdm(points, desc="interpolating", unit="point", disable=not progress):
            with torch.no_grad():
                for k in keys:
                    target[k].copy_(torch.lerp(a[k], b[k], float(alpha)))
            loss = float(loss_fn(model))
            if np.isnan(loss):
                raise ValueError(f"loss_fn returned NaN at alpha={alpha}")
            losses[alpha] = loss
    out = np.array([losses[x] for x in alphas.tolist()])
    l0, l1 = losses[0.0], losses[1.0]
    excess = out - (l0 + alphas * (l1 - l0))  # the chord; exactly L(0) when L(0) = L(1)
    barrier = max(0.0, float(excess.max()))
    return {
        "alphas": alphas,
        "losses": out,
        "excess": excess,
        "barrier": barrier,
        "loss_a": l0,
        "loss_b": l1,
    }


class _restored:
    """Context: copy the named model tensors, restore them on exit and check bit-identity."""

    def __init__(self, model: torch.nn.Module, keys: Sequence[str] | None = None) -> None:
        target = float_tensors(model)
        self.target = {k: target[k] for k in (keys if keys is not None else target)}

    def __enter__(self) -> _restored:
        self.saved = {k: t.detach().clone() for k, t in self.target.items()}
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for k, t in self.target.items():
                t.copy_(self.saved[k])
        bad = [k for k, t in self.target.items() if not torch.equal(t, self.saved[k])]
        if bad and exc[0] is None:
            raise RuntimeError(f"weights not restored bit-identically: {bad[:5]}")


# ----------------------------------------------------------------------------------- distances
def _group(name: str, by: str | Callable[[str], str]) -> str:
    if callable(by):
        return by(name)
    if by == "tensor":
        return name
    m = _LAYER.match(name)
    if by == "layer" and m:
        return m.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name  # module path: "lm_head", ...


def displacement(theta: Weights, theta0: Weights, by: str | Callable = "layer") -> dict:
    """L2 distance ‖θ − θ0‖ in float64, in total, per tensor and per group of tensors.

    Args:
        theta, theta0: state dicts, models or safetensors folders with the same tensors
            (folders are read one tensor at a time).
        by: grouping of ``per_layer``: "layer" (``...layers.<i>`` prefix; other tensors by their
            module path, e.g. ``model.embed_tokens``, ``lm_head``), "module", "tensor", or a
            callable name → group.

    Returns:
        dict with ``total`` (float), ``per_tensor`` and ``per_layer`` (name → float).
    """
    if by not in ("layer", "module", "tensor") and not callable(by):
        raise ValueError(f"by must be 'layer', 'module', 'tensor' or a callable, got {by!r}")
    t, t0 = as_weights(theta), as_weights(theta0)
    keys = _check_same_keys({"theta": t, "theta0": t0})
    per_tensor: dict[str, float] = {}
    sq: dict[str, float] = {}
    for k in keys:
        x, x0 = t[k], t0[k]
        if x.shape != x0.shape:
            raise ValueError(f"{k}: shape {tuple(x.shape)} vs {tuple(x0.shape)} in theta0")
        _check_finite(x, f"theta[{k!r}]")
        _check_finite(x0, f"theta0[{k!r}]")
        s = float(
            (x.detach().to("cpu", torch.float64) - x0.detach().to("cpu", torch.float64))
            .pow(2)
            .sum()
        )
        per_tensor[k] = s**0.5
        g = _group(k, by)
        sq[g] = sq.get(g, 0.0) + s
    total = sum(sq.values()) ** 0.5
    return {
        "total": total,
        "per_tensor": per_tensor,
        "per_layer": {g: v**0.5 for g, v in sq.items()},
    }


def displacement_ratio(theta_joint: Weights, theta_merged: Weights, theta0: Weights) -> float:
    """‖θ_joint − θ0‖ / ‖θ_merged − θ0‖ (the paper reports 2.4–2.9× for MERIT-2D)."""
    merged = displacement(theta_merged, theta0)["total"]
    if merged == 0.0:
        raise ValueError("the merged model equals θ0: displacement ratio undefined")
    return displacement(theta_joint, theta0)["total"] / merged


def norm_inequality(thetas: Sequence[Weights], weights: Sequence[float], theta0: Weights) -> dict:
    """Convexity of the squared norm: ‖θ̄ − θ0‖² ≤ Σ_i w_i ‖θ_i − θ0‖² with θ̄ = Σ_i w_i θ_i.

    The gap is exactly the weighted spread Σ_i w_i ‖θ_i − θ̄‖²: the merge sits closer to θ0.

    Returns:
        dict with ``lhs``, ``rhs``, ``spread`` (= rhs − lhs, computed directly) and ``holds``.
    """
    srcs = [as_weights(t) for t in thetas]
    if not srcs:
        raise ValueError("norm_inequality needs at least one checkpoint")
    w = check_weights(weights, len(srcs))
    t0 = as_weights(theta0)
    keys = _check_same_keys({"theta0": t0, **{f"thetas[{i}]": s for i, s in enumerate(srcs)}})
    lhs = rhs = spread = 0.0
    for k in keys:
        x0 = t0[k].detach().to("cpu", torch.float64)
        d = []
        for i, s in enumerate(srcs):
            x = s[k].detach().to("cpu", torch.float64)
            if x.shape != x0.shape:
                raise ValueError(f"{k}: thetas[{i}] shape {tuple(x.shape)} vs {tuple(x0.shape)}")
            _check_finite(x, f"thetas[{i}][{k!r}]")
            d.append(x - x0)
        dbar = sum(wi * di for wi, di in zip(w, d, strict=True))
        lhs += float(dbar.pow(2).sum())
        rhs += sum(wi * float(di.pow(2).sum()) for wi, di in zip(w, d, strict=True))
        spread += sum(wi * float((di - dbar).pow(2).sum()) for wi, di in zip(w, d, strict=True))
    holds = lhs <= rhs * (1.0 + 1e-9) + 1e-300
    return {"lhs": lhs, "rhs": rhs, "spread": spread, "holds": bool(holds)}


# ---------------------------------------------------------------------------------- flatness
def perturbation_curve(
    model: torch.nn.Module,
    loss_fn: LossFn,
    sigmas: Sequence[float],
    seeds: Sequence[int] = (0, 1, 2),
    relative: bool = False,
    *,
    progress: bool = True,
) -> pd.DataFrame:
    """Loss increase under Gaussian weight noise, the flatness diagnostic (d) of the paper.

    Every floating-point parameter W gets N(0, s²) noise with s = σ (isotropic) or
    s = σ·‖W‖/√numel(W) (``relative``: σ times the tensor's RMS). Noise is drawn on the CPU from
    ``torch.Generator().manual_seed(seed)`` so draws do not depend on the device. σ = 0 leaves the
    weights untouched (delta exactly 0). Weights are restored bit-identically afterwards.

    Returns:
        Long table, one row per (sigma, seed): sigma, seed, loss, delta (= loss − base_loss),
        base_loss. See `summarize_perturbation`.
    """
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(not np.isfinite(s) or s < 0 for s in sigmas):
        raise ValueError(f"sigmas must be finite and ≥ 0, got {sigmas}")
    if not seeds:
        raise ValueError("perturbation_curve needs at least one seed")
    # Tied parameters appear once, so tied tensors get the same noise.
    params = {k: p for k, p in model.named_parameters() if p.is_floating_point()}
    base = float(loss_fn(model))
    if np.isnan(base):
        raise ValueError("loss_fn returned NaN on the unperturbed model")
    rows = []
    jobs = [(s, seed) for s in sigmas for seed in seeds]
    rms = {k: float(p.detach().double().norm()) / p.numel() ** 0.5 for k, p in params.items()}
    with _restored(model) as saved:
        for sigma, seed in tqdm(jobs, desc="perturbing", unit="draw", disable=not progress):
            if sigma > 0:
                gen = torch.Generator().manual_seed(int(seed))
                with torch.no_grad():
                    for k, p in params.items():
                        scale = sigma * rms[k] if relative else sigma
                        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                        p.copy_(saved.saved[k] + (scale * noise).to(p.device, p.dtype))
            loss = float(loss_fn(model))
            rows.append(
                {
                    "sigma": sigma,
                    "seed": int(seed),
                    "loss": loss,
                    "delta": loss - base,
                    "base_loss": base,
                }
            )
            if sigma > 0:
                with torch.no_grad():
                    for k, p in params.items():
                        p.copy_(saved.saved[k])
    return pd.DataFrame(rows)


def summarize_perturbation(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (over seeds) of loss and delta per sigma: index sigma, 5 columns."""
    g = table.groupby("sigma")
    return pd.DataFrame(
        {
            "loss_mean": g["loss"].mean(),
            "loss_std": g["loss"].std(ddof=0),
            "delta_mean": g["delta"].mean(),
            "delta_std": g["delta"].std(ddof=0),
            "n": g["loss"].size(),
        }
    )


def stack_deltas(thetas: Sequence[Weights], theta0: Weights) -> np.ndarray:
    """Flat displacements δ_i = θ_i − θ0: (n, dim) float64, tensors in θ0's key order."""
    t0 = as_weights(theta0)
    srcs = [as_weights(t) for t in thetas]
    keys = _check_same_keys({"theta0": t0, **{f"thetas[{i}]": s for i, s in enumerate(srcs)}})
    base = [t0[k].detach().to("cpu", torch.float64).reshape(-1) for k in keys]
    rows = [
        torch.cat(
            [
                s[k].detach().to("cpu", torch.float64).reshape(-1) - b
                for k, b in zip(keys, base, strict=True)
            ]
        )
        for s in srcs
    ]
    return as_matrix(torch.stack(rows), "deltas")
