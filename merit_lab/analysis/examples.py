"""Examples inside the conflict space: per-example gradients seen from the source level.

Input: per-example sketched gradients of the calibration examples
(`merit_lab.analysis.convergence.sketch_example_gradients`) and the gradient bank they share a
sketch with. Output: ``ExampleSketches`` (inner products with every source row, norms, a re-sketched
copy for resampling), example coordinates in a ``ConflictSpace``, the per-example shares of a
pair's cosine and outlier flags.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.envelope import EnvelopeError, unwrap
from merit_lab.io import atomic_write_bytes

__all__ = [
    "DOMINANT_SHARE",
    "OUTLIER_Z",
    "ExampleSketches",
    "cosine_shares",
    "dots_to_rows",
    "example_coordinates",
    "flag_outliers",
    "pair_contributions",
    "resketch",
    "weighted_mean",
]

# Modified z-score (Iglewicz & Hoaglin: 0.6745·(x − median)/MAD) below which an example's cosine
# to its own source's gradient flags it as an outlier: only the low side (an example that points
# away from its source), at their recommended cut of 3.5.
OUTLIER_Z = 3.5
# An example whose share of its own source's gradient (`ExampleSketches.self_share`: the shares
# sum to 1 over the source) is above this dominates the source: the source's direction is
# mostly that one example's (on the demo, one example of 200 with 127x the median norm).
DOMINANT_SHARE = 0.2
_TENSORS = ("rows", "dots", "norms", "tokens", "bank_norms")
# The header sits in the safetensors metadata (strings only: the version as digits); files from
# before the envelope have none and are read as version 1.
SKETCHES_FORMAT = "merit-lab/example-sketches"
SKETCHES_VERSION = 1


def resketch(rows: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """A count-sketch of rows to ``dim`` columns: (N, D) → (N, dim) float32.

    Each input column j goes to bucket h(j) with sign s(j), both seeded by ``seed`` and D, so
    rows re-sketched in different calls (different sources) are comparable. Linear, so the
    token-weighted mean of re-sketched rows is the re-sketch of the mean; inner products are
    kept in expectation (error ~ |u||v|/√dim).
    """
    x = np.asarray(rows, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"rows must be (N, D), got shape {x.shape}")
    d = x.shape[1]
    if dim >= d:
        return x.copy()
    rng = np.random.default_rng([int(seed), d, int(dim)])
    bucket = rng.integers(0, dim, size=d)
    sign = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=d)
    out = np.zeros((x.shape[0], dim), dtype=np.float32)
    for i in range(x.shape[0]):  # one row at a time: no (N, D) temporaries
        out[i] = np.bincount(bucket, weights=x[i] * sign, minlength=dim)
    return out


@dataclass(frozen=True, eq=False)
class ExampleSketches:
    """Per-example gradients of the calibration examples, as the source level sees them.

    Attributes:
        sources: (N,) the source of each example; examples of a source are contiguous.
        ids: (N,) example ids (``mixture.json``'s ``calibration_ids``).
        tokens: (N,) response tokens of each example: the weights with which a source's bank row
            is their mean (g_A = Σ n_i g_i / Σ n_i, `sketch_example_gradients`).
        dots: (N, T) inner products <g_i, g_t> with the bank rows, at the bank's sketch.
        norms: (N,) |g_i| at the bank's sketch.
        bank_names: (T,) the bank's sources, the column order of ``dots``.
        bank_norms: (T,) |g_t| of the bank rows.
        rows: (N, m) the rows re-sketched to m columns (`resketch`), for resampling.
        texts: (N,) a short text of each example (for hover labels); may be empty strings.
        info: what they were made from (bank key, sketch, re-sketch dim and seed).
    """

    sources: tuple[str, ...]
    ids: tuple[str, ...]
    tokens: np.ndarray
    dots: np.ndarray
    norms: np.ndarray
    bank_names: tuple[str, ...]
    bank_norms: np.ndarray
    rows: np.ndarray
    texts: tuple[str, ...] = ()
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, t = len(self.sources), len(self.bank_names)
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        object.__setattr__(self, "bank_names", tuple(self.bank_names))
        texts = tuple(self.texts) if self.texts else ("",) * n
        object.__setattr__(self, "texts", texts)
        shapes = {"tokens": (n,), "dots": (n, t), "norms": (n,), "bank_norms": (t,)}
        for name, shape in shapes.items():
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.shape != shape:
                raise ValueError(f"ExampleSketches.{name} has shape {arr.shape}, expected {shape}")
            object.__setattr__(self, name, arr)
        rows = np.asarray(self.rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[0] != n:
            raise ValueError(f"ExampleSketches.rows has shape {rows.shape}, expected ({n}, m)")
        object.__setattr__(self, "rows", rows)
        if len(self.ids) != n or len(texts) != n:
            raise ValueError(f"{n} examples but {len(self.ids)} ids and {len(texts)} texts")
        if np.any(self.tokens <= 0):
            raise ValueError("every example needs at least one response token")
        unknown = sorted(set(self.sources) - set(self.bank_names))
        if unknown:
            raise ValueError(f"examples of sources without a bank row: {unknown}")

    @property
    def n_examples(self) -> int:
        return len(self.sources)

    def of(self, source: str) -> np.ndarray:
        """Indices of ``source``'s examples: (n_A,) int64."""
        idx = np.flatnonzero(np.asarray(self.sources, dtype=object) == source)
        if idx.size == 0:
            raise ValueError(f"no examples of source {source!r}")
        return idx

    def cosines(self) -> np.ndarray:
        """cos(g_i, g_t) for every example and bank row: (N, T) float64."""
        return self.dots / np.outer(self.norms, self.bank_norms)

    def own_cosine(self) -> np.ndarray:
        """cos(g_i, g_{source of i}): how much each example points with its own source, (N,)."""
        col = [self.bank_names.index(s) for s in self.sources]
        return self.cosines()[np.arange(self.n_examples), col]

    def self_share(self) -> np.ndarray:
        """Each example's share of its own source's gradient: n_i <g_i, g_A> / (Σ_j n_j |g_A|²)
        (`cosine_shares` of the pair (A, A)); they sum to 1 over a source's examples. (N,)"""
        col = np.array([self.bank_names.index(s) for s in self.sources])
        own_dot = self.dots[np.arange(self.n_examples), col]
        total = pd.Series(self.tokens).groupby(np.asarray(self.sources, dtype=object)).sum()
        w_sum = total.loc[list(self.sources)].to_numpy()
        return self.tokens * own_dot / (w_sum * self.bank_norms[col] ** 2)

    def table(self, space: ConflictSpace | None = None, r: int = 2) -> pd.DataFrame:
        """One row per example: source, id, text, tokens, norm, own cosine, robust z, outlier
        flag (`flag_outliers`), share of its source's gradient and ``dominant`` flag
        (`DOMINANT_SHARE`), and (with ``space``) its first ``r`` coordinates ``z0``.."""
        own = self.own_cosine()
        frame = pd.DataFrame(
            {
                "source": list(self.sources),
                "id": list(self.ids),
                "text": list(self.texts),
                "tokens": self.tokens.astype(np.int64),
                "norm": self.norms,
                "own_cosine": own,
                "robust_z": _robust_z(own, self.sources),
            }
        )
        frame["outlier"] = flag_outliers(own, self.sources)
        frame["self_share"] = self.self_share()
        frame["dominant"] = frame["self_share"] > DOMINANT_SHARE
        if space is not None:
            z = example_coordinates(space, self)
            for j in range(min(r, space.n_sources)):
                frame[f"z{j}"] = z[:, j]
        return frame

    def save(self, path: str | os.PathLike) -> Path:
        """Write the arrays to a safetensors file atomically (the envelope's header, names, ids,
        texts and info in its metadata; all but the header as JSON)."""
        tensors = {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k))) for k in _TENSORS}
        meta = {
            "format": SKETCHES_FORMAT,
            "version": str(SKETCHES_VERSION),
            "sources": json.dumps(list(self.sources)),
            "ids": json.dumps(list(self.ids)),
            "texts": json.dumps(list(self.texts)),
            "bank_names": json.dumps(list(self.bank_names)),
            "info": json.dumps(dict(self.info)),
        }
        return atomic_write_bytes(path, save_safetensors(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExampleSketches:
        """Read a file written by `save`; a cut or foreign file is one ValueError naming it, and
        one of another format or a newer version is refused (`merit_lab.envelope.EnvelopeError`)."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                _check_header(meta, path)
                arrays = {k: f.get_tensor(k).numpy() for k in _TENSORS}
            return cls(
                sources=json.loads(meta["sources"]),
                ids=json.loads(meta["ids"]),
                texts=json.loads(meta["texts"]),
                bank_names=json.loads(meta["bank_names"]),
                info=json.loads(meta["info"]),
                **arrays,
            )
        except EnvelopeError:
            raise
        except Exception as e:  # SafetensorError, OSError, KeyError, ValueError
            raise ValueError(
                f"{path}: not a readable example-sketch file ({e}); delete it and run "
                "`merit-lab examples` again"
            ) from e


def _check_header(meta: Mapping[str, str], path: str | os.PathLike) -> None:
    """Check the envelope header kept in a safetensors file's (string) metadata."""
    header: dict[str, Any] = {k: meta[k] for k in ("format", "version") if k in meta}
    if str(header.get("version", "")).isdigit():
        header["version"] = int(header["version"])
    unwrap(header, SKETCHES_FORMAT, SKETCHES_VERSION, source=path, legacy=True)


def example_coordinates(space: ConflictSpace, sketches: ExampleSketches) -> np.ndarray:
    """PCA coordinates of every example in the sources' conflict space: (N, T) float64.

    Each normalised example row is projected with the sources' own centring and basis
    (`ConflictSpace.project`, vectorised): only its cosines to the space's sources are needed.
    A source's examples scatter around its point; their token-weighted mean direction is it.
    """
    cols = [sketches.bank_names.index(s) for s in space.names]
    c = sketches.cosines()[:, cols]
    lam = space.eigenvalues
    out = np.zeros((c.shape[0], space.n_sources))
    pos = lam > 0
    out[:, pos] = (c - space.cosine.mean(axis=1)[None, :]) @ space.embedding[:, pos] / lam[pos]
    return out


def cosine_shares(
    dots_to_b: np.ndarray, tokens: np.ndarray, norm_a: float, norm_b: float
) -> np.ndarray:
    """Each example's share of cos(g_A, g_B), with g_A = Σ n_i g_i / Σ n_i its examples' mean.

    share_i = n_i <g_i, g_B> / (Σ_j n_j · |g_A| |g_B|), so Σ_i share_i = cos(g_A, g_B) exactly
    (for the unweighted mean the weights are all 1: share_i = <g_i, g_B> / (n_A |g_A||g_B|)).

    Args:
        dots_to_b: (n_A,) <g_i, g_B> for A's examples.
        tokens: (n_A,) their weights in g_A (response tokens).
        norm_a, norm_b: |g_A|, |g_B|.
    """
    d = np.asarray(dots_to_b, dtype=np.float64)
    w = np.asarray(tokens, dtype=np.float64)
    if d.shape != w.shape or d.ndim != 1:
        raise ValueError(f"need (n,) dots and (n,) weights, got {d.shape} and {w.shape}")
    if not (norm_a > 0 and norm_b > 0):
        raise ValueError("zero gradient norm")
    return w * d / (w.sum() * norm_a * norm_b)


def pair_contributions(sketches: ExampleSketches, a: str, b: str) -> pd.DataFrame:
    """Which examples of source ``a`` pull against ``b`` and which pull with it.

    Shares from `cosine_shares` with the bank rows' norms; their sum is the bank cosine up to
    float32 rounding (the bank row is the token-weighted mean of the example rows). Sorted from
    the most negative share (pulls hardest against ``b``) to the most positive.

    Returns:
        Columns ``id``, ``text``, ``tokens``, ``share``, ``cosine_to_b`` (the example's own
        cosine with g_B), indexed by the example's position in ``sketches``.
    """
    idx = sketches.of(a)
    ja, jb = sketches.bank_names.index(a), sketches.bank_names.index(b)
    shares = cosine_shares(
        sketches.dots[idx, jb],
        sketches.tokens[idx],
        sketches.bank_norms[ja],
        sketches.bank_norms[jb],
    )
    frame = pd.DataFrame(
        {
            "id": [sketches.ids[i] for i in idx],
            "text": [sketches.texts[i] for i in idx],
            "tokens": sketches.tokens[idx].astype(np.int64),
            "share": shares,
            "cosine_to_b": sketches.cosines()[idx, jb],
        },
        index=pd.Index(idx, name="example"),
    )
    return frame.sort_values("share", kind="stable")


def _robust_z(values: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    """Modified z-score 0.6745·(x − median)/MAD within each group (0 where MAD = 0)."""
    x = np.asarray(values, dtype=np.float64)
    g = np.asarray(groups, dtype=object)
    z = np.zeros_like(x)
    for name in dict.fromkeys(groups):
        m = g == name
        med = np.median(x[m])
        mad = np.median(np.abs(x[m] - med))
        if mad > 0:
            z[m] = 0.6745 * (x[m] - med) / mad
    return z


def flag_outliers(
    own_cosine: np.ndarray, sources: Sequence[str], threshold: float = OUTLIER_Z
) -> np.ndarray:
    """Examples that point away from their own source: (N,) bool.

    Rule: within each source, the modified z-score 0.6745·(c_i − median)/MAD of the cosine c_i
    between an example's gradient and its source's gradient is below −``threshold`` (3.5 by
    default). A source whose cosines have MAD = 0 flags none.
    """
    return _robust_z(own_cosine, sources) < -threshold


def dots_to_rows(rows: np.ndarray, bank_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(<g_i, g_t>) (N, T) and |g_i| (N,) in float64, from (N, D) example and (T, D) bank rows."""
    x = np.asarray(rows)
    dots = x.astype(np.float64) @ np.asarray(bank_rows, dtype=np.float64).T
    return dots, np.linalg.norm(x.astype(np.float64), axis=1)


def weighted_mean(rows: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Σ w_i x_i / Σ w_i over the rows, in float64: (D,)."""
    w = np.asarray(weights, dtype=np.float64)
    return w @ np.asarray(rows, dtype=np.float64) / w.sum()
