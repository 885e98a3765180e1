"""Conflict space: from the gradient bank to cosine conflicts and their PCA embedding.

Input: (T, d) source gradients (exact or sketched; in memory or memory-mapped, read in column
blocks) and their names. Output: ``ConflictSpace`` (cosine matrix C, PCA eigenvalues and scores
z, explained variance, heatmap order), saved as conflict.json (names, order, variance) and
conflict.safetensors (the (T, T) and (T, R) arrays) in the run directory.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from merit_lab.analysis.array_file import load_beside, save_beside
from merit_lab.envelope import EnvelopeError, load_enveloped, unwrap, wrap

__all__ = [
    "ConflictSpace",
    "compute_conflict_space",
    "space_from_cosine",
]

CONFLICT_FORMAT = "merit-lab/conflict"  # conflict.json: it has carried this header from the start
# 2: the (T, T) and (T, R) arrays in conflict.safetensors beside it (1: every array inline).
CONFLICT_VERSION = 2
# Columns of the bank multiplied at a time: bounds the temporaries to T × 2**16 entries.
_COL_CHUNK = 2**16
# ... and to this many bytes of the bank at a time, whatever T: above T = 1024 the column blocks
# narrow (T = 10,000: 6,710 columns, 40 blocks over d = 2^18), and their products accumulate
# in place in the rows' precision (BLAS syrk, beta = 1: no T × T temporary per block).
_BLOCK_BYTES = 2**28
# Up to this many sources the PCA keeps every axis (a full eigendecomposition, O(T^3): 25 s at
# T = 3000 on 2 loaded cores). Above it, only the top `_TOP_AXES` (a Lanczos solver on J C J,
# 22–31 s for 8–16 axes at T = 10,000, where a full eigh would take ~15 min).
_FULL_PCA_MAX = 2048
_TOP_AXES = 16
# Optimal leaf ordering (flips subtrees so neighbours in the heatmap are most alike) costs
# O(T^3): 1.3 s at T = 1000 against 0.03 s for the linkage. Above this many sources the heatmap
# keeps the plain average-linkage leaf order, which groups the same clusters.
_OPTIMAL_ORDER_MAX = 256


@dataclass(frozen=True, eq=False)
class ConflictSpace:
    """Where each source sits with respect to the others' gradients.

    Attributes:
        names: (T,) source names, the row order of every array.
        cosine: (T, T) float64 cosine matrix C of the source gradients.
        eigenvalues: (R,) the top R eigenvalues of J C J (J = I − 11ᵀ/T), descending, ≥ 0;
            R = T (every axis) unless the space was computed with fewer axes (`axes`, and by
            default above `_FULL_PCA_MAX` sources).
        embedding: (T, R) PCA scores z; column j is the j-th axis, its sign fixed so that its
            largest-magnitude entry is positive. Axes with zero eigenvalue are all-zero.
        explained_variance_ratio: (R,) eigenvalues / the total variance trace(J C J) (with
            every axis: / their sum, the same to rounding).
        order: a permutation of range(T) grouping similar sources (average linkage on 1 − C,
            optimal leaf ordering), for the heatmap.
    """

    names: tuple[str, ...]
    cosine: np.ndarray
    eigenvalues: np.ndarray
    embedding: np.ndarray
    explained_variance_ratio: np.ndarray
    order: tuple[int, ...]

    def __post_init__(self) -> None:
        t = len(self.names)
        r = int(np.shape(self.eigenvalues)[0]) if np.ndim(self.eigenvalues) == 1 else -1
        if not 0 < r <= t:
            raise ValueError(f"ConflictSpace.eigenvalues must be (R,) with 0 < R <= {t}")
        for field, shape in [
            ("cosine", (t, t)),
            ("eigenvalues", (r,)),
            ("embedding", (t, r)),
            ("explained_variance_ratio", (r,)),
        ]:
            arr = getattr(self, field)
            # A float64 array already read-only is shared as it is (the (T, T) cosines of a
            # large T are not copied); any other is copied, so the caller's stays writable.
            if not (isinstance(arr, np.ndarray) and arr.dtype == np.float64) or (
                arr.flags.writeable
            ):
                arr = np.array(arr, dtype=np.float64)
            if arr.shape != shape:
                raise ValueError(f"ConflictSpace.{field} has shape {arr.shape}, expected {shape}")
            arr.setflags(write=False)  # frozen means frozen: the arrays are shared read-only
            object.__setattr__(self, field, arr)
        if sorted(self.order) != list(range(t)):
            raise ValueError("ConflictSpace.order is not a permutation of the sources")
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "order", tuple(int(i) for i in self.order))

    @property
    def n_sources(self) -> int:
        return len(self.names)

    @property
    def n_axes(self) -> int:
        """Axes with positive variance (at most T − 1: centring removes one direction)."""
        return int(np.count_nonzero(self.eigenvalues > 0))

    def index(self, name: str) -> int:
        """Row of source ``name``."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"unknown source {name!r}") from None

    def coords(self, r: int) -> np.ndarray:
        """The first r PCA coordinates of every source: (T, r) float64."""
        kept = self.embedding.shape[1]
        if not 0 <= r <= kept:
            raise ValueError(
                f"r must be in [0, {kept}], got {r}"
                + ("" if kept == self.n_sources else f" (the space keeps the top {kept} axes)")
            )
        return self.embedding[:, :r].copy()

    def select(self, names: Sequence[str]) -> ConflictSpace:
        """The conflict space of a subset of the sources (PCA redone on their cosines)."""
        idx = [self.index(n) for n in names]
        return space_from_cosine(self.cosine[np.ix_(idx, idx)], [self.names[i] for i in idx])

    def project(self, cosines: np.ndarray) -> np.ndarray:
        """PCA coordinates of a new unit gradient from its cosines to this space's sources.

        With V, Λ the eigenpairs of J C J and u the new unit row, the score on axis ℓ is
        (u − ū)ᵀ(Uᵀ J v_ℓ)/√λ_ℓ = Σ_t v_ℓt (c_t − C̄_t)/√λ_ℓ (constants vanish as v_ℓ ⊥ 1).

        Args:
            cosines: (T,) cosines of the new source to ``names``, in their order.

        Returns:
            (R,) float64 coordinates, one per kept axis; zero on axes without variance. A
            source of the space projects onto its own embedding row.
        """
        c = np.asarray(cosines, dtype=np.float64).reshape(-1)
        if c.shape != (self.n_sources,):
            raise ValueError(f"need {self.n_sources} cosines, got {c.shape}")
        lam = self.eigenvalues
        out = np.zeros(lam.shape[0])
        pos = lam > 0
        out[pos] = (self.embedding[:, pos].T @ (c - self.cosine.mean(axis=1))) / lam[pos]
        return out

    def _payload(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "eigenvalues": self.eigenvalues.tolist(),
            "explained_variance_ratio": self.explained_variance_ratio.tolist(),
            "order": list(self.order),
        }

    def to_dict(self) -> dict[str, Any]:
        """The space as one JSON document, its arrays inline (version 1 of ``conflict.json``;
        ``drift.json`` embeds its θ₀ space so): for small T only."""
        arrays = {"cosine": self.cosine.tolist(), "embedding": self.embedding.tolist()}
        return wrap(CONFLICT_FORMAT, 1, {**self._payload(), **arrays})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | os.PathLike = "") -> ConflictSpace:
        """The space of a `to_dict` document; another format or a newer version is refused
        (`merit_lab.envelope.EnvelopeError`, naming ``source``)."""
        payload = unwrap(d, CONFLICT_FORMAT, CONFLICT_VERSION, source=source)
        if "cosine" not in payload:
            where = f"{os.fspath(source)}: " if source else ""
            raise ValueError(f"{where}the arrays are in a file beside it: use ConflictSpace.load")
        return cls._from_payload(payload)

    @classmethod
    def _from_payload(cls, d: Mapping[str, Any], arrays: Mapping | None = None) -> ConflictSpace:
        d = {**d, **(arrays or {})}
        return cls(
            names=tuple(d["names"]),
            cosine=np.asarray(d["cosine"], dtype=np.float64),
            eigenvalues=np.asarray(d["eigenvalues"], dtype=np.float64),
            embedding=np.asarray(d["embedding"], dtype=np.float64),
            explained_variance_ratio=np.asarray(d["explained_variance_ratio"], dtype=np.float64),
            order=tuple(d["order"]),
        )

    def save(self, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the (T, T) cosines and (T, R) embedding to ``<stem>.safetensors`` and then the
        rest, with their sha256 and any ``extra`` keys, to ``path`` (conflict.json: written
        last, it marks the space saved); both atomically, the arrays streamed in row blocks."""
        arrays = {"cosine": self.cosine, "embedding": self.embedding}
        payload = {**self._payload(), **(extra or {})}
        return save_beside(path, CONFLICT_FORMAT, CONFLICT_VERSION, payload, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConflictSpace:
        """Read conflict.json and map its arrays (read-only, pages read as used); a version-1
        file with the arrays inline reads too. Every problem is one ValueError naming the file
        (a newer or foreign one: `merit_lab.envelope.EnvelopeError`)."""
        path = Path(path)
        try:
            d = load_enveloped(path, CONFLICT_FORMAT, CONFLICT_VERSION)
            if "cosine" not in d:  # version 2: the arrays beside it (1: every array inline)
                redo = "run the conflict stage again (it rewrites both files)"
                d, arrays = load_beside(path, CONFLICT_FORMAT, CONFLICT_VERSION, redo)
                d = {**d, **arrays}
            return cls._from_payload(d)
        except EnvelopeError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(what if str(path) in what else f"{path}: {what}") from e


def _column_width(t: int, itemsize: int) -> int:
    """Columns per block: `_COL_CHUNK`, narrowed so a block stays within `_BLOCK_BYTES`."""
    return max(1, min(_COL_CHUNK, _BLOCK_BYTES // max(1, t * itemsize)))


def _read_block(rows: np.ndarray | torch.Tensor, lo: int, hi: int) -> np.ndarray:
    """Columns lo:hi of every row as a C-contiguous numpy copy, float64 rows in float64 and
    others in float32 (a product would copy a strided block anyway: this copy is the only
    one)."""
    block = rows[:, lo:hi]
    if isinstance(block, torch.Tensor):
        block = block.detach().to("cpu")
        block = block.numpy() if block.dtype == torch.float64 else block.float().numpy()
    dtype = np.float64 if block.dtype == np.float64 else np.float32
    return np.ascontiguousarray(block, dtype=dtype)


@dataclass(frozen=True)
class _MappedRows:
    """Where the rows of a `np.memmap` (or a row slice of one) lie in its file, so blocks are
    read with ``pread`` (no page of the bank ever enters this process's resident set) and the
    next block is announced to the kernel while this one multiplies."""

    fd: int
    first: int  # file offset of rows[0, 0]
    step: int  # bytes from one row to the next
    rows: np.ndarray

    @classmethod
    def open(cls, rows: object) -> _MappedRows | None:
        mapping = getattr(rows, "_mmap", None)  # np.memmap sets it on the map and its slices
        if not isinstance(mapping, mmap.mmap) or rows.dtype not in (np.float32, np.float64):
            return None
        if rows.strides[1] != rows.itemsize or not getattr(rows, "filename", None):
            return None
        # np.memmap maps the file from its offset rounded down to the allocation granularity
        start = rows.offset - rows.offset % mmap.ALLOCATIONGRANULARITY
        first = start + rows.ctypes.data - np.frombuffer(mapping, dtype=np.uint8).ctypes.data
        return cls(os.open(rows.filename, os.O_RDONLY), first, rows.strides[0], rows)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Columns lo:hi of every row, read from the file into a new C-contiguous array."""
        size = self.rows.itemsize
        out = np.empty((self.rows.shape[0], hi - lo), dtype=self.rows.dtype)
        for r in range(out.shape[0]):
            want = out[r].nbytes
            got = os.preadv(
                self.fd, [memoryview(out[r]).cast("B")], self.first + r * self.step + lo * size
            )
            if got != want:
                raise OSError(f"{self.rows.filename}: short read ({got} of {want} bytes)")
        return out

    def prefetch(self, lo: int, hi: int) -> None:
        """Start the kernel reading columns lo:hi of every row (asynchronous): a column block
        is T short segments of the file, which reads one by one take at ~25-50 MB/s on this
        machine's disk (300+ MB/s sequential)."""
        size = self.rows.itemsize
        if not hasattr(os, "posix_fadvise"):  # not on macOS: reads are then on demand
            return
        for r in range(self.rows.shape[0] if lo < hi else 0):
            at = self.first + r * self.step + lo * size
            os.posix_fadvise(self.fd, at, (hi - lo) * size, os.POSIX_FADV_WILLNEED)


def _gram(rows: np.ndarray | torch.Tensor) -> tuple[np.ndarray, list[int]]:
    """G = X Xᵀ, a block of columns at a time; and the non-finite rows.

    Each block's product is taken in the rows' own precision: float64 rows in float64, float32
    (and half-precision) rows in float32, which is 2× faster and ~1e-7 off in the cosines
    (measured against float64) — four orders below a 2^18 count-sketch's own error (~5e-3).
    Blocks of `_COL_CHUNK` columns (T ≤ 1024) are summed in float64. Narrower blocks (larger
    T: a block holds at most `_BLOCK_BYTES` of the bank) accumulate in place in the rows'
    precision, as BLAS itself accumulates within one product, so the only T × T array is G.
    A memory-mapped bank (`merit_lab.gradients.bank.map_rows`) is read from its file block by
    block (``pread``: its pages never enter the resident set), the next block's read started
    while the current one multiplies.

    Returns:
        ((T, T) float64 G, or float32 for float32 rows past T = 1024; the rows whose squared
        norm is not finite: a NaN or infinity in a row reaches its own diagonal entry).
    """
    from scipy.linalg import blas

    t, d = rows.shape
    itemsize = 8 if rows.dtype in (np.float64, torch.float64) else 4
    width = _column_width(t, itemsize)
    wide = width == _COL_CHUNK  # the float64 sum of the products, as it has always been
    gram = np.zeros((t, t), dtype=np.float64 if wide or itemsize == 8 else np.float32)
    mapped = _MappedRows.open(rows) if hasattr(os, "preadv") else None
    try:
        if mapped is not None:
            mapped.prefetch(0, min(width, d))
        for lo in range(0, d, width):
            hi = min(lo + width, d)
            if mapped is None:
                block = _read_block(rows, lo, hi)
            else:
                block = mapped.read(lo, hi)
                mapped.prefetch(hi, min(hi + width, d))  # read while this block multiplies
            if wide:
                gram += block @ block.T  # numpy takes a product with its own transpose by syrk
            else:
                syrk = blas.dsyrk if itemsize == 8 else blas.ssyrk
                # On the Fortran views (no copies): G += X_b X_bᵀ into G's lower triangle.
                syrk(1.0, block.T, beta=1.0, c=gram.T, trans=1, overwrite_c=1)
            del block  # before the next read: one block in memory at a time, not two
    finally:
        if mapped is not None:
            os.close(mapped.fd)
    if not wide:
        _mirror_lower(gram)
    bad = np.flatnonzero(~np.isfinite(np.diag(gram)))
    return gram, bad.tolist()


def _mirror_lower(a: np.ndarray, strip: int = 512) -> None:
    """Copy the lower triangle of the square ``a`` onto its upper triangle, a strip at a time."""
    t = a.shape[0]
    for lo in range(0, t, strip):
        hi = min(lo + strip, t)
        block = a[lo:hi, lo:hi]
        block[np.triu_indices(hi - lo, 1)] = block.T[np.triu_indices(hi - lo, 1)]
        a[lo:hi, hi:] = a[hi:, lo:hi].T


def compute_conflict_space(
    rows: np.ndarray | torch.Tensor, names: Sequence[str], *, axes: int | None = None
) -> ConflictSpace:
    """Cosine conflict matrix and its PCA embedding.

    The paper's PCA is on normalised gradients g̃_t = g_t / ‖g_t‖ (scale-invariant: a source's
    gradient norm, which tracks its loss level, does not move it in conflict space). With U the
    (T, d) unit rows and J = I − 11ᵀ/T, the centred Gram matrix is (JU)(JU)ᵀ = J C J, so its
    eigenvectors V and eigenvalues Λ give the PCA scores z = V·sqrt(Λ) exactly (the same as
    ``sklearn.decomposition.PCA().fit_transform(U)`` up to the sign of each axis). Only the
    (T, T) matrix C is decomposed: the d-dimensional rows are read once, a column block at a
    time, to form C, so a memory-mapped bank of any size needs about one block of memory beside
    the T × T matrices (`_gram`).

    Args:
        rows: (T, d) gradients, any float dtype, numpy (a `np.memmap` too) or torch (any
            device).
        names: (T,) distinct source names, in row order.
        axes: PCA axes to keep (the top ones). None: all of them up to `_FULL_PCA_MAX`
            sources, the top `_TOP_AXES` above (see `space_from_cosine`).

    Returns:
        The ConflictSpace of the T sources.

    Raises:
        ValueError: T < 2, names and rows disagree, duplicate names, axes < 1, or a row that
            is non-finite or zero (the error names the source).
    """
    names = tuple(names)
    if len(rows.shape) != 2:
        raise ValueError(f"rows must be (T, d), got shape {tuple(rows.shape)}")
    t = rows.shape[0]
    if t != len(names):
        raise ValueError(f"{t} rows but {len(names)} names")
    if t < 2:
        raise ValueError(f"need at least 2 sources for a conflict space, got {t}")
    if len(set(names)) != t:
        seen: set[str] = set()
        dupes = sorted({n for n in names if n in seen or seen.add(n)})
        raise ValueError(f"duplicate source names: {dupes}")
    _check_axes(axes)

    gram, bad = _gram(rows)
    if bad:
        raise ValueError(f"non-finite gradient for sources: {[names[i] for i in bad]}")
    norms = np.sqrt(np.diag(gram).astype(np.float64))
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ValueError(f"zero gradient for sources: {[names[i] for i in zero]}")
    cosine = np.empty((t, t), dtype=np.float64) if gram.dtype != np.float64 else gram
    for lo in range(0, t, 1024):  # in place, a strip at a time (the same values elementwise)
        hi = min(lo + 1024, t)
        np.clip(gram[lo:hi] / np.outer(norms[lo:hi], norms), -1.0, 1.0, out=cosine[lo:hi])
    del gram
    return _space(cosine, names, order=True, axes=axes)


def _check_axes(axes: int | None) -> None:
    if axes is not None and (isinstance(axes, bool) or not isinstance(axes, int) or axes < 1):
        raise ValueError(f"axes must be a positive integer or None, got {axes!r}")


def space_from_cosine(
    cosine: np.ndarray, names: Sequence[str], *, order: bool = True, axes: int | None = None
) -> ConflictSpace:
    """The conflict space of T sources from their (T, T) cosine matrix alone (the PCA of unit
    gradients needs nothing else; see `compute_conflict_space`). ``order=False`` leaves the
    heatmap order as given (the clustering is most of the time of a split of T = 32).

    ``axes``: how many top PCA axes to keep. None keeps all T up to `_FULL_PCA_MAX` sources
    (one full eigendecomposition) and the top `_TOP_AXES` above; a number keeps that many
    (at most T). Up to `_FULL_PCA_MAX` sources the kept axes are the full eigendecomposition's
    first ones exactly; above it they come from a Lanczos solver (ARPACK, to machine
    precision, deterministic start), equal to them to float rounding wherever the eigenvalue
    is apart from the next (axes in a cluster of near-equal eigenvalues are any basis of it).
    """
    _check_axes(axes)
    return _space(np.array(cosine, dtype=np.float64), tuple(names), order=order, axes=axes)


def _space(cosine: np.ndarray, names: tuple[str, ...], *, order: bool, axes: int | None):
    """`space_from_cosine` on a (T, T) float64 ``cosine`` this module owns (changed in place)."""
    t = len(names)
    _symmetrize(cosine)
    np.fill_diagonal(cosine, 1.0)
    full = t <= _FULL_PCA_MAX
    keep = min(t, axes if axes is not None else (t if full else _TOP_AXES))
    if full or keep >= t - 1:
        evals, evecs = _all_eigenpairs(cosine)
        evals, evecs = evals[:keep], evecs[:, :keep]
    else:
        evals, evecs = _top_eigenpairs(cosine, keep)
    # Round-off leaves ~1e-16 eigenvalues (always one: the all-ones direction); treat them as
    # exact zeros so their arbitrary eigenvectors never reach the embedding.
    tol = max(float(evals[0]), 1.0) * t * np.finfo(np.float64).eps * 10
    evals[evals < tol] = 0.0
    embedding = evecs * np.sqrt(evals)[None, :]
    for j in range(keep):
        col = embedding[:, j]
        if col[np.argmax(np.abs(col))] < 0:
            embedding[:, j] = -col
    # trace(J C J) = T (1 − mean C) with a unit diagonal; with every axis, the eigenvalues' sum
    total = evals.sum() if keep == t else t * (1.0 - float(cosine.mean()))
    ratio = evals / total if total > 0 else np.zeros(keep)
    cosine.setflags(write=False)  # shared with the space, not copied (`ConflictSpace`)
    return ConflictSpace(
        names=names,
        cosine=cosine,
        eigenvalues=evals,
        embedding=embedding,
        explained_variance_ratio=ratio,
        order=_cluster_order(cosine) if order else tuple(range(t)),
    )


def _symmetrize(c: np.ndarray, strip: int = 512) -> None:
    """c ← (c + cᵀ) / 2 in place, a strip at a time (no (T, T) temporary)."""
    t = c.shape[0]
    for lo in range(0, t, strip):
        hi = min(lo + strip, t)
        block = c[lo:hi, lo:hi]
        block[...] = (block + block.T) / 2
        mean = (c[lo:hi, hi:] + c[hi:, lo:hi].T) / 2
        c[lo:hi, hi:] = mean
        c[hi:, lo:hi] = mean.T


def _all_eigenpairs(cosine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every eigenpair of J C J, eigenvalues descending: (T,), (T, T)."""
    centred = cosine - cosine.mean(axis=0, keepdims=True)
    centred = centred - centred.mean(axis=1, keepdims=True)
    centred = (centred + centred.T) / 2
    evals, evecs = np.linalg.eigh(centred)
    return evals[::-1].copy(), evecs[:, ::-1].copy()


def _top_eigenpairs(cosine: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """The top r eigenpairs of J C J without forming it: (r,), (T, r), descending.

    ARPACK's Lanczos iteration on v ↦ J C (J v) (a product with C per step: 0.09 s at
    T = 10,000), converged to machine precision (``tol=0``) from a fixed start vector.
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    t = cosine.shape[0]

    def apply(v: np.ndarray) -> np.ndarray:
        v = v - v.mean(axis=0)
        out = cosine @ v
        return out - out.mean(axis=0)

    op = LinearOperator((t, t), matvec=apply, matmat=apply, dtype=np.float64)
    start = np.random.default_rng(0).standard_normal(t)
    evals, evecs = eigsh(op, k=r, which="LA", v0=start, tol=0)
    down = np.argsort(evals)[::-1]
    return evals[down].copy(), evecs[:, down].copy()


def _cluster_order(cosine: np.ndarray) -> tuple[int, ...]:
    from scipy.cluster.hierarchy import leaves_list, linkage

    t = cosine.shape[0]
    if t < 3:
        return tuple(range(t))
    # The condensed distances 1 − C (upper triangle, row by row), built a row at a time: the
    # same values as squareform(clip(1 − C)) without a second (T, T) matrix.
    dist = np.empty(t * (t - 1) // 2)
    at = 0
    for i in range(t - 1):
        dist[at : at + t - 1 - i] = cosine[i, i + 1 :]
        at += t - 1 - i
    np.subtract(1.0, dist, out=dist)
    np.clip(dist, 0.0, 2.0, out=dist)
    z = linkage(dist, method="average", optimal_ordering=t <= _OPTIMAL_ORDER_MAX)
    return tuple(int(i) for i in leaves_list(z))
