"""Gradient sketches: compress one source's gradient, parameter by parameter, into a (dim,) row.

Input: (name, grad) pairs as they come out of backward. Output: a float32 row of the gradient
bank. Every kind is a fixed linear map derived only from (seed, parameter name, coordinate), so
rows computed in different processes or on different machines with the same spec are comparable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from merit_lab.config.schema import DEFAULT_SKETCH_DIM, SKETCH_KINDS, SketchSpec

__all__ = [
    "DEFAULT_SKETCH_DIM",
    "SKETCH_KINDS",
    "GradientSketch",
    "SketchSpec",
    "build_sketch",
    "bytes_per_source",
    "sketch_fidelity",
]


# Coordinates per step, which bounds the temporaries whatever the parameter size. On CPU
# chunks stay in the L3 cache and below malloc's mmap threshold (2**22 is ~5x slower there); CPU
# time per coordinate on 56.6M coordinates (1 thread, loaded machine): a cached pass 3.2-3.7 ns
# at 2**17 against 4.0-4.6 at 2**15, the pass that fills the cache 10.8-13.4 against 14.4-22.4.
# On GPU large chunks amortise kernel launches. The chunking never changes the result.
_CHUNK_CPU = 2**17
_CHUNK_GPU = 2**22
# Partial rows of a threaded pass (`GradientSketch.sketch_parallel`): part of its rounding, so
# fixed, not the thread count; at most 8 x 2·dim float32 of memory, kept by the sketch.
_PARTS = 8
# ... but each at least this many chunks (4M coordinates): a part is a 2·dim row to clear and
# sum (the demo base's 653k coordinates: 12.6 ms a pass in 5 parts, 2.5 ms in 1).
_PART_CHUNKS = 32
# Gaussian: entries of the projection generated per block of parameter coordinates. The block
# size is part of the map's definition (changing it changes every Gaussian row), so it is fixed
# and depends on dim only.
_GAUSSIAN_BLOCK_ENTRIES = 2**20
_MASK32 = 0xFFFFFFFF
# A cached code is 2·bucket + (1 where the sign is −1), an int32: so dims up to 2**30 are cached
# (a larger dim, a 4 GiB row, hashes on every pass). Shifted left by 31 its low bit is the int32
# sign bit, which XOR-ed into a float32 negates it exactly; shifted right by 1 it is the bucket.
_CACHE_MAX_DIM = 2**30
# Cached codes on the CPU: at most this share of the physical memory (SmolLM2's 134.5M
# coordinates need 538 MB; 1/16 of 16 GiB is 1 GiB).
_CPU_CACHE_SHARE = 16


def _digest(*parts: object) -> bytes:
    # JSON encoding keeps ("a", "bc") and ("ab", "c") apart.
    return hashlib.sha256(json.dumps(["merit-lab", *parts]).encode("utf-8")).digest()


def _to_int64(u: int) -> int:
    """Reinterpret an unsigned 64-bit integer as a signed one (torch has no uint64 arithmetic)."""
    return u - 2**64 if u >= 2**63 else u


def _hash_coeffs(seed: int, name: str) -> tuple[int, int]:
    """(a, b) of parameter ``name``'s multiply-add-shift hash, as int64, from sha256."""
    d = _digest("countsketch", seed, name)
    a = int.from_bytes(d[:8], "little")
    b = int.from_bytes(d[8:16], "little")
    return _to_int64(a), _to_int64(b)


def _buckets_and_signs(
    seed: int, name: str, dim: int, start: int, stop: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets (int64 in [0, dim)) and signs (float32 ±1) of coordinates start..stop-1 of name.

    One multiply-add-shift hash h(i) = (a·i + b) mod 2**64 (torch int64 arithmetic wraps) per
    parameter: for i < 2**32 and random 64-bit (a, b), its top 33 bits are a strongly universal
    (pairwise independent) hash of i [Dietzfelbinger 1996; Thorup 2015], which is what makes
    count-sketch inner products unbiased. The top 32 bits pick the bucket, the 33rd the sign.
    Parameters over 2**32 entries still hash well, without the formal guarantee.
    """
    a, b = _hash_coeffs(seed, name)
    h = torch.arange(start, stop, dtype=torch.int64, device=device).mul_(a).add_(b)
    sign = h.bitwise_right_shift(31).bitwise_and_(1).to(torch.float32).mul_(-2.0).add_(1.0)
    # Top 32 bits scaled to [0, dim) by a multiply-high, so dim need not be a power of two.
    bucket = h.bitwise_right_shift_(32).bitwise_and_(_MASK32).mul_(dim).bitwise_right_shift_(32)
    return bucket, sign


def _hash_codes(
    seed: int, name: str, dim: int, start: int, stop: int, device: torch.device
) -> torch.Tensor:
    """`_buckets_and_signs` packed into int32 codes 2·bucket + (1 where the sign is −1), with
    fewer int64 passes (dim ≤ 2**30). The sign is −1 exactly where bit 31 of h is set.

    The same code is the coordinate's slot in a sign-split row of 2·dim floats (slot 2b sums
    the coordinates of bucket b with sign +1, slot 2b + 1 those with −1; `_split_row`), where
    a pass is a single scatter: no sign to apply (`GradientSketch.sketch_parallel`)."""
    a, b = _hash_coeffs(seed, name)
    h = torch.arange(start, stop, dtype=torch.int64, device=device).mul_(a).add_(b)
    negative = h.bitwise_right_shift(31).bitwise_and_(1)
    bucket = h.bitwise_right_shift_(32).bitwise_and_(_MASK32).mul_(dim).bitwise_right_shift_(32)
    return bucket.mul_(2).add_(negative).to(torch.int32)


def _split_row(parts: torch.Tensor) -> torch.Tensor:
    """Sign-split rows (k, 2·dim) float32 → their sketch row (dim,) float32: over the k rows,
    in float64, the sum of the +1 slots (2b) minus the sum of the −1 slots (2b + 1), rounded
    once."""
    wide = parts[0].to(torch.float64)
    for part in parts[1:]:  # in order (a float64 sum along the rows' axis ran at ~1 GB/s)
        wide.add_(part)
    wide = wide.view(-1, 2)
    return (wide[:, 0] - wide[:, 1]).to(torch.float32)


def _subsample_offset(seed: int, every: int) -> int:
    return int.from_bytes(_digest("subsample", seed)[:8], "little") % every


def _gaussian_seed(seed: int, name: str, block: int) -> int:
    return int.from_bytes(_digest("gaussian", seed, name, block)[:8], "little") >> 1


class GradientSketch:
    """A fixed linear map R^n → R^dim over the declared parameters, applied one parameter at a time.

    Kinds:
        countsketch: coordinate i of parameter ``name`` is added, times a sign s(i) ∈ {±1}, to
            bucket h(i). Both come from multiply-add-shift hashes whose coefficients are the
            sha256 of (seed, name, purpose), evaluated on int64 coordinate indices on the row's
            device: no global RNG, independent of parameter order and of the device. Inner
            products are preserved in expectation (E⟨Sx, Sy⟩ = ⟨x, y⟩). The sum is an
            ``index_add_`` in float32: on CPU rows are bit-identical across runs; on GPU atomic
            adds make the last bits depend on scheduling (differences ~1e-7 relative).
        gaussian: a dense JL projection with N(0, 1/dim) entries, generated per block of
            coordinates from a CPU ``torch.Generator`` seeded by (seed, name, block), so it is
            the same map on every device. Costs O(numel × dim) time: for small models only.
        subsample: keeps the coordinates whose global index (parameters concatenated in the
            declared order) is ≡ offset (mod every), offset derived from the seed.
        exact: the concatenation of all declared parameters (dim = total numel).

    Memory per call is O(dim + largest parameter). A count-sketch keeps each parameter's buckets
    and signs once computed (one int32 per coordinate, 2·bucket + the sign bit; dims up to
    2**30) while they fit ``cache_bytes``: every source, and every fold of a source, reuses
    them. The hashing was 60% of a sketch step on an H100; on the CPU, over SmolLM2's 134.5M
    coordinates, a cached pass takes 0.43-0.48 CPU-seconds and the pass that fills the cache
    1.07-1.18 (1 thread; a raw ``index_add_`` of every coordinate, the floor, is ~0.25). A
    cached code's sign bit is XOR-ed into the float32 value's, which negates it exactly, so the
    rows are bit-identical with or without the cache.

    Args:
        spec: which map.
        params: (name, shape) of every parameter that may be added, in a fixed order (the order
            matters only for subsample and exact).
        device: where rows live and hashing runs.
        cache_bytes: memory for cached count-sketch hashes (default: 10% of a GPU's memory;
            1/16 of the physical memory on the CPU).
    """

    def __init__(
        self,
        spec: SketchSpec,
        params: Sequence[tuple[str, tuple[int, ...]]],
        device: str | torch.device = "cpu",
        cache_bytes: int | None = None,
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        if cache_bytes is None:
            if self.device.type == "cuda":
                cache_bytes = torch.cuda.get_device_properties(self.device).total_memory // 10
            else:
                cache_bytes = _physical_memory() // _CPU_CACHE_SHARE
        cached = spec.kind == "countsketch" and spec.dim <= _CACHE_MAX_DIM  # fits an int32 code
        self._cache_left = cache_bytes if cached else 0
        self._codes: dict[tuple[str, int, int], torch.Tensor] = {}  # (name, lo, hi) → int32
        self._parts: torch.Tensor | None = None  # `sketch_parallel`'s partial rows, reused
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._offsets: dict[str, int] = {}  # global start index of each parameter
        total = 0
        for name, shape in params:
            if name in self._shapes:
                raise ValueError(f"parameter {name!r} declared twice")
            shape = tuple(int(s) for s in shape)
            self._shapes[name] = shape
            self._offsets[name] = total
            total += math.prod(shape)
        self.n_params = total
        self._sub_offset = _subsample_offset(spec.seed, spec.every)
        if spec.kind in ("countsketch", "gaussian"):
            self.dim = spec.dim
        elif spec.kind == "subsample":
            self.dim = len(range(self._sub_offset, total, spec.every))
        else:
            self.dim = total

    def __repr__(self) -> str:
        return (
            f"GradientSketch({self.spec.kind}, dim={self.dim}, "
            f"params={len(self._shapes)}, n={self.n_params})"
        )

    def sketch_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """Sketch a flat gradient laid out as the ``exact`` kind lays it out (declared order).

        Lets one exact gradient pass be compared with any sketch of the same gradients.

        Args:
            flat: (n_params,) the concatenated parameter gradients.
        """
        if flat.numel() != self.n_params:
            raise ValueError(f"flat gradient has {flat.numel()} entries, expected {self.n_params}")
        return self.sketch(
            (name, flat[off : off + math.prod(shape)].view(shape))
            for (name, shape), off in zip(self._shapes.items(), self._offsets.values(), strict=True)
        )

    def zeros(self) -> torch.Tensor:
        """An empty row: (dim,) float32 on the sketch's device."""
        return torch.zeros(self.dim, dtype=torch.float32, device=self.device)

    def add_(
        self,
        row: torch.Tensor,
        name: str,
        grad: torch.Tensor,
        *,
        check: bool = True,
        square_norm: bool = False,
    ) -> float | None:
        """Add parameter ``name``'s contribution to ``row`` in place.

        Args:
            row: (dim,) float32 accumulator on the sketch's device.
            name: a declared parameter.
            grad: its gradient, exactly the declared shape, any float dtype and device.
            check: refuse non-finite entries (a count-sketch pass whose gradient is checked
                later may skip it: the fold passes, whose .grad the bank row's pass sums).
            square_norm: also return ‖grad‖² (float64 sums of the entries squared in float64).
                A count-sketch reads each chunk once for both (the norm as a separate pass cost
                more than the sketch on SmolLM2), and its finiteness check is then the norm's:
                float64 squares of finite float32 entries cannot overflow, so the sum is
                finite exactly when every entry is.

        Returns:
            ``grad``'s squared L2 norm with ``square_norm``, else None.

        Raises:
            ValueError: unknown parameter, wrong shape, non-finite entries, or a malformed row.
        """
        flat = self._flat(name, grad)
        if row.shape != (self.dim,) or row.dtype != torch.float32:
            raise ValueError(
                f"row must be ({self.dim},) float32, got {tuple(row.shape)} {row.dtype}"
            )
        kind = self.spec.kind
        if kind == "countsketch":
            return self._add_countsketch(row, name, flat, check, square_norm)
        sq = None
        if square_norm:
            sq = float(torch.linalg.vector_norm(flat, dtype=torch.float64).square())
        if kind == "gaussian":
            self._add_gaussian(row, name, flat)
        elif kind == "subsample":
            start = self._offsets[name]
            first = (self._sub_offset - start) % self.spec.every
            pos = len(range(self._sub_offset, start, self.spec.every))
            # Checked in full: a nan outside the kept coordinates is still a broken gradient.
            _check_finite(flat, name)
            vals = flat[first :: self.spec.every].to(device=row.device, dtype=torch.float32)
            row[pos : pos + vals.numel()] += vals
        else:
            start = self._offsets[name]
            row[start : start + flat.numel()] += _finite_f32(flat, name, row.device)
        return sq

    def _flat(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` flattened, once ``name`` and its shape are checked against the declaration."""
        if name not in self._shapes:
            raise ValueError(f"parameter {name!r} was not declared to this sketch")
        if tuple(grad.shape) != self._shapes[name]:
            raise ValueError(
                f"gradient of {name!r} has shape {tuple(grad.shape)}, declared {self._shapes[name]}"
            )
        return grad.detach().reshape(-1)

    def _add_countsketch(
        self, row: torch.Tensor, name: str, flat: torch.Tensor, check: bool, square_norm: bool
    ) -> float | None:
        cpu = row.device.type == "cpu"
        with _one_intra_op_thread() if cpu else contextlib.nullcontext():
            return self._add_countsketch_chunks(row, name, flat, check, square_norm)

    def _add_countsketch_chunks(
        self, row: torch.Tensor, name: str, flat: torch.Tensor, check: bool, square_norm: bool
    ) -> float | None:
        chunk = _CHUNK_CPU if row.device.type == "cpu" else _CHUNK_GPU
        sq = torch.zeros((), dtype=torch.float64, device=row.device) if square_norm else None
        for lo in range(0, flat.numel(), chunk):
            hi = min(lo + chunk, flat.numel())
            vals = flat[lo:hi].to(device=row.device, dtype=torch.float32)
            if sq is not None:  # the norm from the gradient's own dtype (float64 stays float64)
                wide = flat[lo:hi].to(device=row.device, dtype=torch.float64)
                sq += torch.dot(wide, wide)
            elif check:
                _check_finite(vals, name)
            self._add_chunk(row, name, vals, lo, hi, self._reserve(name, lo, hi))
        if sq is None:
            return None
        total = float(sq)  # one synchronisation per parameter, not per chunk
        if check and not math.isfinite(total) and not bool(torch.isfinite(flat).all()):
            raise ValueError(f"gradient of {name!r} has non-finite entries (nan or inf)")
        return total

    def _reserve(self, name: str, lo: int, hi: int) -> bool:
        """Whether chunk (name, lo, hi)'s codes are to be hashed into the cache now: not cached
        yet, and the budget holds them (taken from it here; none past `_CACHE_MAX_DIM`)."""
        if (name, lo, hi) in self._codes or 4 * (hi - lo) > self._cache_left:
            return False
        self._cache_left -= 4 * (hi - lo)
        return True

    def _code(
        self, name: str, lo: int, hi: int, fill: bool, device: torch.device
    ) -> torch.Tensor | None:
        """Chunk (name, lo, hi)'s cached codes, hashed into the cache where ``fill``, or None."""
        code = self._codes.get((name, lo, hi))
        if code is None and fill:
            code = _hash_codes(self.spec.seed, name, self.dim, lo, hi, device)
            self._codes[(name, lo, hi)] = code
        return code

    def _add_chunk(
        self, row: torch.Tensor, name: str, vals: torch.Tensor, lo: int, hi: int, fill: bool
    ) -> None:
        """Add coordinates lo..hi-1 of ``name`` (``vals``, float32 on the row's device) to
        ``row``, from the cached codes, or hashed now (into the cache where ``fill``)."""
        code = self._code(name, lo, hi, fill, row.device)
        if code is None:  # vals may be a view of the caller's gradient: multiply out of place
            bucket, sign = _buckets_and_signs(self.spec.seed, name, self.dim, lo, hi, row.device)
            row.index_add_(0, bucket, vals * sign)
            return
        signed = vals.view(torch.int32).bitwise_xor(code.bitwise_left_shift(31))
        row.index_add_(0, code.bitwise_right_shift(1), signed.view(torch.float32))

    def _add_chunk_split(
        self,
        split: torch.Tensor,
        name: str,
        vals: torch.Tensor,
        lo: int,
        hi: int,
        fill: bool,
        slots: torch.Tensor,
    ) -> None:
        """`_add_chunk` into a sign-split row (2·dim float32, `_split_row`): ``vals`` are
        scattered as they are, coordinate i to slot 2·bucket(i) + (1 where its sign is −1).
        ``slots``: an int64 buffer of at least hi − lo entries (scatter_add_ takes int64 and is
        the fastest CPU scatter: 1.8 ns a coordinate against index_add_'s 2.2, one thread)."""
        code = self._code(name, lo, hi, fill, split.device)
        if code is None:
            bucket, sign = _buckets_and_signs(self.spec.seed, name, self.dim, lo, hi, split.device)
            split.scatter_add_(0, bucket.mul_(2).add_(sign < 0), vals)
            return
        index = slots[: hi - lo]
        index.copy_(code)
        split.scatter_add_(0, index, vals)

    def sketch_parallel(
        self, named_grads: Iterable[tuple[str, torch.Tensor]], threads: int | None = None
    ) -> torch.Tensor:
        """A whole gradient's sketch (dim,) float32, computed by up to ``threads`` threads
        (default: torch's intra-op threads) and not checked for finiteness: the stage's fold
        passes, whose summed ``.grad`` the row's own pass checks.

        A CPU count-sketch sums it as k = min(`_PARTS`, chunks // `_PART_CHUNKS`) (at least 1)
        partial sign-split rows (`_split_row`): the pass's chunks (`_CHUNK_CPU` coordinates,
        over the parameters in the order given) are cut into k runs of consecutive chunks, as
        equal in count as they divide; run p is scattered into part p in float32 in coordinate
        order, each coordinate as it is into the slot of its bucket and sign; then in float64
        the parts' +1 slots are summed, and their −1 slots, the second taken from the first,
        and the row rounded once. So the row is the same bits for any number of threads, and
        the same map as `add_`'s with another order of the float32 sums (only the rounding
        differs). The split row saves applying the sign, so a pass is one scatter a chunk: over
        SmolLM2's 134.5M coordinates on 2 quiet cores, 0.23 s against 0.29 s with the sign
        applied (7 alternating rounds, per-round ratio 0.58–0.94, median 0.69;
        `docs/performance.md`, fold sketches). The parts are kept between passes and summed
        part by part: on the demo base (653k coordinates, dim 2**18) a pass took 40 ms with 8
        fresh parts summed at once, 2.5 ms in one kept part. Each thread runs its torch ops on
        one intra-op thread (`_one_intra_op_thread`). Other kinds and devices: `add_` in turn.
        """
        named_grads = list(named_grads)
        if self.spec.kind != "countsketch" or self.device.type != "cpu":
            row = self.zeros()
            for name, grad in named_grads:
                self.add_(row, name, grad, check=False)
            return row
        items = [(name, self._flat(name, g)) for name, g in named_grads]
        work = [  # (name, coordinates, lo, hi, fill): the cache budget is taken in pass order
            (name, flat, lo, hi, self._reserve(name, lo, hi))
            for name, flat in items
            for lo in range(0, flat.numel(), _CHUNK_CPU)
            for hi in (min(lo + _CHUNK_CPU, flat.numel()),)
        ]
        k = max(1, min(_PARTS, len(work) // _PART_CHUNKS))
        cuts = [len(work) * p // k for p in range(k + 1)]
        if self._parts is None:  # kept: a fresh 16 MiB (dim 2**18) costs its page faults
            self._parts = torch.empty(_PARTS, 2 * self.dim, dtype=torch.float32)
        parts = self._parts[:k].zero_()
        n_threads = max(1, min(threads or torch.get_num_threads(), k))

        def run(t: int) -> None:
            slots = torch.empty(_CHUNK_CPU, dtype=torch.int64)  # this thread's scatter index
            for p in range(t, k, n_threads):
                for name, flat, lo, hi, fill in work[cuts[p] : cuts[p + 1]]:
                    vals = flat[lo:hi].to(device=parts.device, dtype=torch.float32)
                    self._add_chunk_split(parts[p], name, vals, lo, hi, fill, slots)

        with _one_intra_op_thread():
            if n_threads == 1:
                run(0)
            else:
                with ThreadPoolExecutor(n_threads) as pool:  # scatter_add_ releases the GIL
                    list(pool.map(run, range(n_threads)))
        return _split_row(parts)

    def _add_gaussian(self, row: torch.Tensor, name: str, flat: torch.Tensor) -> None:
        block = max(1, _GAUSSIAN_BLOCK_ENTRIES // self.dim)
        scale = 1.0 / math.sqrt(self.dim)
        for j, lo in enumerate(range(0, flat.numel(), block)):
            vals = _finite_f32(flat[lo : lo + block], name, row.device)
            gen = torch.Generator(device="cpu").manual_seed(_gaussian_seed(self.spec.seed, name, j))
            proj = torch.randn(vals.numel(), self.dim, generator=gen, dtype=torch.float32)
            row.add_(vals @ proj.to(row.device), alpha=scale)

    def sketch(self, named_grads: Iterable[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """Sketch a whole gradient: (dim,) float32. Parameters not listed contribute zero."""
        row = self.zeros()
        for name, grad in named_grads:
            self.add_(row, name, grad)
        return row


@contextlib.contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """torch's intra-op threads set to one for the block. A CPU pass's ops are on chunks of
    2**17 coordinates, too small to split: on 2 threads a cached pass over SmolLM2's 134.5M
    coordinates took 0.67-1.30 CPU-s for no less wall time, against 0.39-0.63 on one
    (`benchmarks.bench_gradients`, "count-sketch pass", 2026-12-06). The scatter itself is one
    thread either way."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def _physical_memory() -> int:
    """Bytes of physical memory (0 where the OS does not say: no cache)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


def _check_finite(x: torch.Tensor, name: str) -> None:
    # A nan/inf entry makes the sum non-finite, and the sum is far cheaper than isfinite(x); the
    # full check runs only when the sum is not finite (which overflow alone can also cause).
    if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"gradient of {name!r} has non-finite entries (nan or inf)")


def _finite_f32(x: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """x as float32 on device (possibly x itself: never modify it in place), all finite."""
    y = x.to(device=device, dtype=torch.float32)
    _check_finite(y, name)
    return y


def build_sketch(
    spec: SketchSpec,
    params: Sequence[tuple[str, tuple[int, ...]]],
    device: str | torch.device = "cpu",
    cache_bytes: int | None = None,
) -> GradientSketch:
    """Build the sketch for ``spec`` over ``params`` ((name, shape) pairs in a fixed order)."""
    return GradientSketch(spec, params, device, cache_bytes)


def bytes_per_source(spec: SketchSpec, n_params: int) -> int:
    """Bytes of one float32 bank row for a model with ``n_params`` selected coordinates."""
    if spec.kind in ("countsketch", "gaussian"):
        dim = spec.dim
    elif spec.kind == "subsample":
        dim = len(range(_subsample_offset(spec.seed, spec.every), n_params, spec.every))
    else:
        dim = n_params
    return 4 * dim


def sketch_fidelity(exact_rows: np.ndarray, sketched_rows: np.ndarray) -> dict[str, float]:
    """How well sketched rows keep the pairwise cosines of the exact ones.

    Args:
        exact_rows: (T, n) reference gradients.
        sketched_rows: (T, dim) their sketches, same row order.

    Returns:
        ``pearson``: Pearson correlation of the T(T-1)/2 off-diagonal cosines (nan when fewer
        than two pairs or the cosines are constant); ``max_abs_error`` and ``mean_abs_error`` of
        those cosines; ``n_pairs``.
    """
    exact = np.asarray(exact_rows, dtype=np.float64)
    sk = np.asarray(sketched_rows, dtype=np.float64)
    if exact.ndim != 2 or sk.ndim != 2 or exact.shape[0] != sk.shape[0]:
        raise ValueError(f"need (T, n) and (T, dim) rows, got {exact.shape} and {sk.shape}")
    if exact.shape[0] < 2:
        raise ValueError("need at least two rows to compare cosines")

    def offdiag_cosines(x: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(x, axis=1)
        if np.any(norms == 0):
            raise ValueError("a row has zero norm; its cosines are undefined")
        c = (x @ x.T) / np.outer(norms, norms)
        return c[np.triu_indices(x.shape[0], k=1)]

    a, b = offdiag_cosines(exact), offdiag_cosines(sk)
    err = np.abs(a - b)
    pearson = float("nan")
    if a.size >= 2 and a.std() > 0 and b.std() > 0:
        pearson = float(np.corrcoef(a, b)[0, 1])
    return {
        "pearson": pearson,
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "n_pairs": int(a.size),
    }
