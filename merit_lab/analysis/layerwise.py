"""Layer- and module-wise conflict: each source's gradient sketched once more per parameter group.

Input: a source's summed ``.grad`` in the gradient stage's backward pass (`estimate_gradients`'s
``on_gradient`` hook). Output: a `LayerBank` (one sketched row per group, concatenated) and a
`LayerConflict`: each group's cosine matrix and the exact split of every pairwise cosine, and
of each conflict axis, into the groups' contributions.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from merit_lab.analysis.conflict import ConflictSpace, space_from_cosine
from merit_lab.config.schema import LAYER_GROUPINGS, SketchSpec
from merit_lab.envelope import load_enveloped, save_enveloped
from merit_lab.gradients.sketch import build_sketch
from merit_lab.io import atomic_write_bytes

__all__ = [
    "KINDS",
    "LAYER_GROUPINGS",
    "LayerBank",
    "LayerCollector",
    "LayerConflict",
    "ParamGroup",
    "axis_shares",
    "binary_contrast",
    "compute_layer_conflict",
    "decompose_cosines",
    "group_cosines",
    "group_parameters",
    "group_spec",
    "key_view",
]

LAYERS_FORMAT = "merit-lab/layer-bank"  # layers.json; files from before the envelope read as v1
LAYERS_VERSION = 1
# The kinds a group can be, in the order groups are listed (and figure rows drawn).
KINDS = ("embeddings", "attention", "mlp", "norm", "layer", "head", "other")
# A transformer block: Llama/Qwen ``model.layers.3.``, GPT-2 ``transformer.h.3.``, others.
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_IN_LAYER = (
    ("attention", re.compile(r"(?:^|\.)(?:self_attn|attn|attention|self_attention)\.")),
    ("mlp", re.compile(r"(?:^|\.)(?:mlp|feed_forward|ffn|moe|experts)\.")),
    ("norm", re.compile(r"(?:layernorm|layer_norm|ln_\d|norm)")),
)
_EMBED = re.compile(r"(?:embed|wte|wpe|embeddings)")
_HEAD = re.compile(r"(?:lm_head|ln_f|final_layer_norm|final_norm|(?:^|\.)norm\.)")


@dataclass(frozen=True)
class ParamGroup:
    """One group of parameters and where its sketch sits in a `LayerBank` row.

    Attributes:
        name: ``embeddings``, ``layer.3`` (grouping ``layers``), ``layer.3.mlp`` (``modules``),
            ``head`` or ``other``.
        kind: one of `KINDS`.
        layer: the transformer layer index, or None outside the layers.
        parameters: the parameter names in the group.
        start, stop: its columns in the concatenated row.
    """

    name: str
    kind: str
    layer: int | None
    parameters: tuple[str, ...]
    start: int = 0
    stop: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "parameters": list(self.parameters)}


def _kind_and_layer(name: str, grouping: str) -> tuple[str, int | None]:
    m = _LAYER.search(name)
    if m is not None:
        if grouping == "layers":
            return "layer", int(m.group(1))
        rest = name[m.end() :]
        for kind, pattern in _IN_LAYER:
            if pattern.search("." + rest):
                return kind, int(m.group(1))
        return "other", int(m.group(1))
    if _EMBED.search(name):
        return "embeddings", None
    if _HEAD.search(name):
        return "head", None
    return "other", None


def group_parameters(names: Sequence[str], grouping: str) -> list[ParamGroup]:
    """Group parameter names by module name (Llama/Qwen ``model.layers.N.self_attn.*``, GPT-2
    ``transformer.h.N.attn.*``, ...): ``layers`` gives embeddings, one group per transformer
    layer, the head (final norm, lm_head); ``modules`` splits each layer into attention, MLP,
    norms (and ``other``). Groups come in order: embeddings, layers by index (attention, mlp,
    norm within one), head, other; empty groups are left out; offsets are not yet set.
    """
    if grouping not in ("layers", "modules"):
        raise ValueError(f"grouping must be 'layers' or 'modules', got {grouping!r}")
    found: dict[tuple[str, int | None], list[str]] = {}
    for name in names:
        found.setdefault(_kind_and_layer(name, grouping), []).append(name)

    def order(key: tuple[str, int | None]) -> tuple:
        kind, layer = key
        where = 0 if kind == "embeddings" else 2 if layer is None else 1
        return (where, -1 if layer is None else layer, KINDS.index(kind))

    groups = []
    for kind, layer in sorted(found, key=order):
        if layer is None:
            name = kind
        else:
            name = f"layer.{layer}" if grouping == "layers" else f"layer.{layer}.{kind}"
        groups.append(ParamGroup(name, kind, layer, tuple(found[(kind, layer)])))
    return groups


def group_spec(bank_spec: SketchSpec, layer_dim: int) -> SketchSpec:
    """Each group's sketch: the bank's kind and seed at width ``layer_dim`` (count-sketch,
    Gaussian; exact and subsample keep their own widths)."""
    return dataclasses.replace(bank_spec, dim=layer_dim)


def key_view(obj: Any, drop: Sequence[str]) -> dict[str, Any]:
    """A config dataclass as a dict without the fields ``drop``: its stage keys stay what they
    were before those fields existed (`config_hash` hashes a dict and a dataclass alike)."""
    return {k: v for k, v in dataclasses.asdict(obj).items() if k not in drop}


class LayerCollector:
    """The ``on_gradient`` hook of `estimate_gradients`: sketches each group's slice of the
    source's gradient into its own block of a row, while ``.grad`` is still there.

    The row is the concatenation of G independent sketches, itself a (block) sketch of the whole
    gradient, so its inner products are exactly the sums of the groups' inner products.

    Args:
        params: (name, shape) of the selected parameters.
        grouping: ``layers`` or ``modules`` (`group_parameters`).
        spec: each group's sketch (`group_spec`).
        device: where the rows are summed.
        on_row: called with (source, row) for each finished source (e.g. to save it).
    """

    def __init__(
        self,
        params: Sequence[tuple[str, tuple[int, ...]]],
        grouping: str,
        spec: SketchSpec,
        device: str | torch.device = "cpu",
        on_row: Callable[[str, np.ndarray], None] | None = None,
    ) -> None:
        shapes = dict(params)
        self.spec, self.on_row = spec, on_row
        self.sketches, groups, start = [], [], 0
        for g in group_parameters(list(shapes), grouping):
            sk = build_sketch(spec, [(n, shapes[n]) for n in g.parameters], device=device)
            self.sketches.append(sk)
            groups.append(dataclasses.replace(g, start=start, stop=start + sk.dim))
            start += sk.dim
        self.groups = tuple(groups)
        self.dim = start
        self._where = {n: i for i, g in enumerate(self.groups) for n in g.parameters}
        self.rows: dict[str, np.ndarray] = {}

    def __call__(self, source: str, selected: Sequence[tuple[str, torch.Tensor]]) -> None:
        blocks = [sk.zeros() for sk in self.sketches]
        for name, p in selected:
            if p.grad is not None:  # a parameter the loss does not reach contributes zero
                i = self._where[name]
                self.sketches[i].add_(blocks[i], name, p.grad)
        row = torch.cat(blocks).cpu().numpy()
        self.rows[source] = row
        if self.on_row is not None:
            self.on_row(source, row)


@dataclass(frozen=True)
class LayerBank:
    """T sources' group-wise sketched gradients.

    Attributes:
        names: (T,) source names.
        groups: the groups, each with its columns [start, stop) of ``rows``.
        rows: (T, D) float32, D = the sum of the groups' widths.
        info: what the rows depend on (grouping, sketch, the bank's settings, key).
    """

    names: tuple[str, ...]
    groups: tuple[ParamGroup, ...]
    rows: np.ndarray
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        d = self.groups[-1].stop if self.groups else 0
        if self.rows.shape != (len(self.names), d):
            raise ValueError(f"rows {self.rows.shape}, expected ({len(self.names)}, {d})")

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    def group(self, name: str) -> ParamGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise ValueError(f"unknown layer group {name!r}; groups: {list(self.group_names)}")

    def group_rows(self, name: str) -> np.ndarray:
        """(T, d_g) rows of one group: a sketch of that group's slice of each gradient."""
        g = self.group(name)
        return self.rows[:, g.start : g.stop]

    def select(self, names: Sequence[str]) -> LayerBank:
        idx = [self.names.index(n) for n in names]
        return LayerBank(tuple(names), self.groups, self.rows[idx], self.info)

    def save(self, folder: str | Path) -> Path:
        """``layers.safetensors`` (rows) and ``layers.json`` (names, groups, info), atomically."""
        folder = Path(folder)
        payload = save_safetensors({"rows": torch.from_numpy(np.ascontiguousarray(self.rows))})
        atomic_write_bytes(folder / "layers.safetensors", payload)
        meta = {
            "names": list(self.names),
            "groups": [g.to_dict() for g in self.groups],
            "info": dict(self.info),
        }
        save_enveloped(folder / "layers.json", LAYERS_FORMAT, LAYERS_VERSION, meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> LayerBank:
        """Read `save`'s files; a ``layers.json`` of another format or a newer version is
        refused (`merit_lab.envelope.EnvelopeError`)."""
        folder = Path(folder)
        meta = load_enveloped(folder / "layers.json", LAYERS_FORMAT, LAYERS_VERSION, legacy=True)
        with safe_open(folder / "layers.safetensors", framework="pt") as f:
            rows = f.get_tensor("rows").numpy()
        groups = tuple(
            ParamGroup(**{**g, "parameters": tuple(g["parameters"])}) for g in meta["groups"]
        )
        return cls(tuple(meta["names"]), groups, rows, meta["info"])


def _group_grams(bank: LayerBank) -> np.ndarray:
    """(G, T, T) float64 Gram matrix of each group's rows."""
    out = np.empty((len(bank.groups), len(bank.names), len(bank.names)))
    for i, g in enumerate(bank.groups):
        x = bank.rows[:, g.start : g.stop].astype(np.float64)
        out[i] = x @ x.T
    return out


def decompose_cosines(bank: LayerBank) -> np.ndarray:
    """Each group's contribution to every pairwise cosine: (G, T, T) float64 whose sum over the
    groups is the cosine matrix of the whole rows, exactly.

    With r_a = [r_a1, …, r_aG] (the group blocks), ⟨r_a, r_b⟩ = Σ_k ⟨r_ak, r_bk⟩, so
    cos(a, b) = Σ_k ⟨r_ak, r_bk⟩ / (‖r_a‖ ‖r_b‖): group k's term is its contribution. The
    diagonal terms are group k's share of each source's squared norm (they sum to 1).
    """
    grams = _group_grams(bank)
    norms = np.sqrt(np.einsum("gtt->t", grams))
    if np.any(norms == 0):
        zero = [bank.names[i] for i in np.flatnonzero(norms == 0)]
        raise ValueError(f"zero gradient for sources {zero}")
    return grams / np.outer(norms, norms)[None]


def group_cosines(bank: LayerBank) -> np.ndarray:
    """(G, T, T) cosine matrix of each group on its own (nan where a source's group gradient is
    zero, e.g. a group its loss does not reach)."""
    grams = _group_grams(bank)
    norms = np.sqrt(np.einsum("gtt->gt", grams))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = grams / (norms[:, :, None] * norms[:, None, :])
    return np.clip(cos, -1.0, 1.0)


def axis_shares(contributions: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Each group's share of the conflict along a direction over the sources: (G,) summing to 1.

    With J the centring, v = J·direction and C = Σ_k C_k, share_k = vᵀ C_k v / vᵀ C v. For v a
    PCA axis of J C J (v ⟂ 1) the denominator is its eigenvalue: the share is how much of that
    axis's variance group k's inner products carry (negative: the group pulls the other way).
    """
    v = np.asarray(direction, dtype=np.float64)
    v = v - v.mean()
    per_group = np.einsum("a,gab,b->g", v, contributions, v)
    total = per_group.sum()
    if abs(total) < 1e-15:
        raise ValueError("no conflict along this direction (vᵀ C v = 0)")
    return per_group / total


def binary_contrast(labels: Sequence[Any]) -> np.ndarray:
    """±1 over sources for a label with exactly two values (e.g. the demo's style): the
    direction that separates them, for `axis_shares`."""
    values = sorted({str(x) for x in labels})
    if len(values) != 2:
        raise ValueError(f"a contrast needs exactly two label values, got {values}")
    return np.array([1.0 if str(x) == values[1] else -1.0 for x in labels])


@dataclass(frozen=True)
class LayerConflict:
    """Where in the model the sources conflict.

    Attributes:
        names, groups: the sources and groups (`LayerBank`).
        contributions: (G, T, T) `decompose_cosines`; ``whole`` is their sum.
        cosines: (G, T, T) `group_cosines`.
        whole: the conflict space of the whole rows (Σ_k contributions).
        axis_shares: (G, k) each group's share of the whole space's first k axes.
        pc1_agreement: (G,) |Pearson| of each group's own PC1 scores with the whole PC1.
        contrasts: label → (G,) shares of a labelled contrast (`binary_contrast`).
    """

    names: tuple[str, ...]
    groups: tuple[ParamGroup, ...]
    contributions: np.ndarray
    cosines: np.ndarray
    whole: ConflictSpace
    axis_shares: np.ndarray
    pc1_agreement: np.ndarray
    contrasts: Mapping[str, np.ndarray] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        """One JSON-ready record per group: kind, layer, shares, PC1 agreement."""
        out = []
        for i, g in enumerate(self.groups):
            rec = {
                "group": g.name,
                "kind": g.kind,
                "layer": g.layer,
                "pc1_agreement": float(self.pc1_agreement[i]),
            }
            rec.update({f"share_pc{j + 1}": float(s) for j, s in enumerate(self.axis_shares[i])})
            rec.update({f"share_{k}": float(v[i]) for k, v in self.contrasts.items()})
            out.append(rec)
        return out


def compute_layer_conflict(
    bank: LayerBank, *, k: int = 2, contrasts: Mapping[str, Sequence[Any]] | None = None
) -> LayerConflict:
    """`LayerConflict` of a `LayerBank`: the groups' shares of the whole space's first ``k`` axes
    and of each labelled contrast (label → one value per source, two distinct values)."""
    contrib = decompose_cosines(bank)
    whole = space_from_cosine(contrib.sum(axis=0), bank.names)
    k = min(k, whole.n_axes)
    lam = whole.eigenvalues[:k]
    vecs = whole.embedding[:, :k] / np.sqrt(lam)[None, :]  # unit eigenvectors
    shares = np.einsum("aj,gab,bj->gj", vecs, contrib, vecs) / lam[None, :]
    cosines = group_cosines(bank)
    agree = np.full(len(bank.groups), np.nan)
    for i in range(len(bank.groups)):
        if np.isfinite(cosines[i]).all():
            own = space_from_cosine(cosines[i], bank.names)
            if own.n_axes and whole.n_axes:
                agree[i] = abs(np.corrcoef(own.embedding[:, 0], whole.embedding[:, 0])[0, 1])
    shares_by_label = {
        label: axis_shares(contrib, binary_contrast(values))
        for label, values in (contrasts or {}).items()
    }
    return LayerConflict(
        bank.names, bank.groups, contrib, cosines, whole, shares, agree, shares_by_label
    )
