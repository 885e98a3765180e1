"""The merge's engine: every input byte read once, merged, written, and hashed on the way.

Input: the inputs' (and θ0's) `Checkpoint` views, a `MergeMethod`, its weights and parameters.
Output: the merged shard files (+ index) and the digests of the input and output files, taken
from the very buffers read and written. Reading the next piece, merging this one and writing the
last overlap on threads; elementwise methods go in pieces of ~4 MiB, others a tensor at a time.
"""

from __future__ import annotations

import inspect
import json
import keyword
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from merit_lab.io import atomic_write_json
from merit_lab.merging.digests import format_digest, new_hasher
from merit_lab.merging.methods import MergeMethod
from merit_lab.models.checkpoints import (
    DTYPES,
    INDEX_NAME,
    Checkpoint,
    is_finite,
    plan_shards,
    shard_header,
    weight_files,
)

__all__ = ["PIECE", "CheckpointFiles", "ShardSink", "merge_into"]

PIECE = 1 << 20  # entries per piece of an elementwise merge: 4 MiB of float32 per input
_HAS_PREADV = hasattr(os, "preadv")


def _pread_into(f: Any, view: memoryview, pos: int, path: Path) -> None:
    """Fill ``view`` from byte ``pos`` of the open file ``f`` (no seek shared between threads)."""
    done = 0
    while done < len(view):
        if _HAS_PREADV:
            n = os.preadv(f.fileno(), [view[done:]], pos + done)
        else:  # pragma: no cover (Linux and macOS have preadv)
            f.seek(pos + done)
            n = f.readinto(view[done:])
        if not n:
            raise ValueError(
                f"{path}: ends at byte {pos + done}, inside tensor data; the file is cut short: "
                "download or save it again"
            )
        done += n


class CheckpointFiles:
    """One checkpoint's weight files open for positioned reads, with a running digest per file.

    Each file's digest covers the prefix read so far in file order (the header at open, then
    every read that starts where the last ended); `digests` hashes what remains, which is
    nothing when the merge read the tensors in this file's order (the normal case: inputs saved
    alike). Digest updates run on this checkpoint's own thread, beside the merge.
    """

    def __init__(self, ckpt: Checkpoint, algorithm: str | None) -> None:
        self.ckpt, self.algorithm = ckpt, algorithm
        self.files: dict[str, Any] = {}
        self.begin: dict[str, int] = {}  # key -> byte where its data starts in its file
        self.hashers: dict[str, Any] = {}
        self.hashed: dict[str, int] = {}  # file -> bytes digested so far (a prefix)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="merge-digest") if algorithm else None
        try:
            for name in sorted({file for file, _, _ in ckpt.tensors.values()}):
                self._open(name)
        except BaseException:
            self.close()
            raise

    def _open(self, name: str) -> None:
        path = self.ckpt.folder / name
        f = self.files[name] = open(path, "rb", buffering=0)  # noqa: SIM115 (closed in close())
        size = bytearray(8)
        _pread_into(f, memoryview(size), 0, path)
        header = bytearray(int.from_bytes(size, "little"))
        _pread_into(f, memoryview(header), 8, path)
        start = 8 + len(header)
        for key, entry in json.loads(header).items():
            if key != "__metadata__":
                self.begin[key] = start + entry["data_offsets"][0]
        if self.algorithm:
            h = self.hashers[name] = new_hasher(self.algorithm)
            h.update(size + header)
            self.hashed[name] = start

    def read(self, key: str, offset: int, view: memoryview) -> Future | None:
        """Fill ``view`` with ``key``'s data from byte ``offset`` of it; returns the digest
        update of those bytes (the buffer must outlive it), or None when none is due."""
        name = self.ckpt.tensors[key][0]
        pos = self.begin[key] + offset
        _pread_into(self.files[name], view, pos, self.ckpt.folder / name)
        if self.pool is None or self.hashed[name] != pos:
            return None
        self.hashed[name] = pos + len(view)
        return self.pool.submit(self.hashers[name].update, view)

    def digests(self) -> dict[str, str]:
        """Weight file name -> digest, for every ``*.safetensors`` file of the folder (as
        `merit_lab.models.checkpoints.file_hashes` lists them), the unread rest hashed now."""
        if self.algorithm is None or self.pool is None:
            raise ValueError(f"{self.ckpt.folder}: opened without a digest, so none to give")
        self.pool.shutdown(wait=True)  # every update submitted so far is in
        out = {}
        buf = bytearray(1 << 22)
        view = memoryview(buf)
        for path in weight_files(self.ckpt.folder):
            h = self.hashers.get(path.name) or new_hasher(self.algorithm)
            with open(path, "rb", buffering=0) as f:
                f.seek(self.hashed.get(path.name, 0))
                while n := f.readinto(buf):
                    h.update(view[:n])
            out[path.name] = format_digest(self.algorithm, h.hexdigest())
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        for f in self.files.values():
            f.close()


def _shard_names(n: int) -> list[str]:
    """The file names ``save_pretrained`` gives ``n`` shards."""
    return (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    )


class ShardSink:
    """The merged shard files, written piece by piece in layout order, fsynced one by one.

    Each shard's digest is taken on its own thread from the bytes handed to ``write``; ``write``
    returns that digest update, which the written buffer must outlive.
    """

    def __init__(self, folder: Path, layout: Checkpoint, shard_size: int, algorithm: str) -> None:
        self.folder, self.layout, self.algorithm = folder, layout, algorithm
        self.shards = plan_shards(layout, shard_size)
        self.names = _shard_names(len(self.shards))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="merge-digest-out")
        self.digests: dict[str, Future] = {}
        self.current, self.f, self.h = -1, None, None

    def _next(self) -> None:
        self._close()
        self.current += 1
        name = self.names[self.current]
        self.f = open(self.folder / name, "wb", buffering=0)  # noqa: SIM115 (closed in _close)
        self.h = new_hasher(self.algorithm)
        header = shard_header(self.shards[self.current], self.layout)
        self._write(header)
        self.pool.submit(self.h.update, header)

    def _write(self, data: memoryview | bytes) -> None:
        # a local ``f``: an out-of-space error then names the file (`merit_lab.cli`)
        f, view, done = self.f, memoryview(data).cast("B"), 0
        while done < len(view):
            done += f.write(view[done:])

    def _close(self) -> None:
        f = self.f
        if f is None:
            return
        os.fsync(f.fileno())
        f.close()
        self.f = None
        h = self.h
        name = self.names[self.current]
        self.digests[name] = self.pool.submit(lambda: format_digest(self.algorithm, h.hexdigest()))

    def write(self, shard: int, data: Tensor) -> Future:
        """Append ``data`` (any dtype, contiguous) to shard ``shard`` (opening the shards up to
        it); returns its digest update."""
        while self.current < shard:
            self._next()
        view = memoryview(data.reshape(-1).view(torch.uint8).numpy())
        self._write(view)
        return self.pool.submit(self.h.update, view)

    def finish(self) -> dict[str, str]:
        """Close the last shard (and write empty ones left), write the index; shard digests."""
        while self.current < len(self.shards) - 1:
            self._next()
        self._close()
        digests = {name: fut.result() for name, fut in self.digests.items()}
        if len(self.shards) > 1:
            tensors = self.layout.tensors
            index = {
                "metadata": {
                    "total_parameters": sum(math.prod(t[2]) for t in tensors.values()),
                    "total_size": sum(map(self.layout.nbytes, tensors)),
                },
                "weight_map": {
                    k: n for n, ks in zip(self.names, self.shards, strict=True) for k in ks
                },
            }
            atomic_write_json(self.folder / INDEX_NAME, index)
        return digests

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class _Piece:
    key: str
    start: int  # first entry
    n: int  # entries
    shard: int
    last: bool  # the tensor's last piece


class _Slot:
    """Buffers for one piece in flight: raw bytes per source, float32 copies, the result."""

    def __init__(self, n_sources: int, raw_bytes: int, entries: int) -> None:
        self.raw_bytes, self.entries = raw_bytes, entries
        self.raw: list[Tensor | None] = [None] * n_sources
        self.f32: list[Tensor | None] = [None] * n_sources
        self.out32: Tensor | None = None
        self.out_raw: Tensor | None = None
        self.result: Tensor | None = None
        self.pending: list[Future] = []  # digest updates that still read this slot's buffers

    def raw_view(self, i: int, nbytes: int, dtype: torch.dtype) -> Tensor:
        if self.raw[i] is None:  # untouched pages cost nothing until written
            self.raw[i] = torch.empty(self.raw_bytes, dtype=torch.uint8)
        return self.raw[i][:nbytes].view(dtype)

    def float32(self, i: int, t: Tensor) -> Tensor:
        if t.dtype == torch.float32:
            return t
        if self.f32[i] is None:
            self.f32[i] = torch.empty(self.entries, dtype=torch.float32)
        return self.f32[i][: t.numel()].copy_(t)  # the same rounding as t.float()

    def out(self, n: int) -> Tensor:
        if self.out32 is None:
            self.out32 = torch.empty(self.entries, dtype=torch.float32)
        return self.out32[:n]

    def as_dtype(self, r: Tensor, dtype: torch.dtype) -> Tensor:
        if r.dtype == dtype:
            return r
        if self.out_raw is None:
            self.out_raw = torch.empty(self.raw_bytes, dtype=torch.uint8)
        n = r.numel() * dtype.itemsize
        return self.out_raw[:n].view(dtype).view(r.shape).copy_(r)  # the same rounding as .to

    def release(self) -> None:
        for fut in self.pending:
            fut.result()
        self.pending.clear()
        self.result = None


def _pieces(layout: Checkpoint, shards: list[list[str]], piece: int | None) -> list[_Piece]:
    out = []
    for s, keys in enumerate(shards):
        for key in keys:
            total = math.prod(layout.tensors[key][2])
            step = max(1, piece or total)
            starts = range(0, total, step) if total else [0]
            out += [_Piece(key, i, min(step, total - i), s, i + step >= total) for i in starts]
    return out


def _nonfinite_input(key: str, folder: Path) -> ValueError:
    return ValueError(
        f"tensor {key!r} has non-finite values in {folder}; the checkpoint is unusable (a "
        "diverged branch: delete its folder and train it again)"
    )


def merge_into(
    folder: Path,
    sources: Sequence[Checkpoint],
    base: Checkpoint | None,
    spec: MergeMethod,
    weights: Sequence[float],
    params: Mapping[str, float],
    *,
    digest: str,
    shard_size: int,
    progress: bool = False,
    piece: int | None = PIECE,
    depth: int | None = None,
) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Merge ``sources`` into shard files in ``folder`` (``sources[0]``'s layout and dtypes).

    Each piece is read once from every source into reused buffers (θ0's only when the method
    uses it), merged in float32 and written in the inputs' dtype; the source files' and shards'
    digests are updated from those buffers on threads of their own. Memory: (depth + 2) slots of
    K + 2 pieces for elementwise methods (~4 MiB each), else K + 2 copies of the largest tensor.

    Args:
        piece: entries per piece of an elementwise method (None: whole tensors; others always).
        depth: pieces read ahead of the one being merged (default 1 in pieces, 0 whole: then
            reading, merging and writing go strictly one after another).

    Returns:
        (shard name -> digest, per source: weight file name -> digest).
    """
    layout, k = sources[0], len(sources)
    whole = piece is None or not spec.elementwise
    use_base = base if spec.needs_base else None
    depth = (0 if whole else 1) if depth is None else depth
    n_slots = depth + 2 if depth > 0 else 1
    sizes = [math.prod(t[2]) for t in layout.tensors.values()]
    itemsize = max((DTYPES[t[1]].itemsize for t in layout.tensors.values()), default=1)
    entries = max(sizes, default=1) if whole else min(piece, max(sizes, default=1))
    raw_bytes = max(8, entries * itemsize + (-(entries * itemsize) % 8))
    try:
        takes_out = "out" in inspect.signature(spec.fn).parameters
    except (TypeError, ValueError):  # a callable without a signature: no ``out=``
        takes_out = False
    kwargs0 = {(p + "_" if keyword.iskeyword(p) else p): v for p, v in params.items()}  # lambda

    # An elementwise merge gives the same bits on any number of threads, and its pieces are
    # small: torch's own worker threads, waiting at every op's end while the read, write and
    # digest threads want the same cores, made it 5-8× slower on 2 shared cores (measured).
    threads = torch.get_num_threads()
    if spec.elementwise:
        torch.set_num_threads(1)
    files: list[CheckpointFiles] = []
    sink = ShardSink(folder, layout, shard_size, digest)
    reader = ThreadPoolExecutor(1, thread_name_prefix="merge-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="merge-write")
    try:
        files += [CheckpointFiles(c, digest) for c in sources]
        files += [CheckpointFiles(use_base, None)] if use_base is not None else []
        pieces = _pieces(layout, sink.shards, None if whole else piece)
        slots = [_Slot(len(files), raw_bytes, entries) for _ in range(n_slots)]

        def read(p: _Piece, slot: _Slot) -> None:
            dtype = DTYPES[layout.tensors[p.key][1]]
            n = len(files) if dtype.is_floating_point else k  # θ0 only for float tensors
            for i, src in enumerate(files[:n]):
                buf = slot.raw_view(i, p.n * dtype.itemsize, torch.uint8)
                update = src.read(p.key, p.start * dtype.itemsize, memoryview(buf.numpy()))
                if update is not None:
                    slot.pending.append(update)

        def merge(p: _Piece, slot: _Slot) -> None:
            _, dname, shape = layout.tensors[p.key]
            dtype = DTYPES[dname]
            nbytes = p.n * dtype.itemsize
            if not dtype.is_floating_point:  # integer buffers cannot be averaged; equal ones kept
                ref = slot.raw_view(0, nbytes, torch.uint8)
                if any(
                    not torch.equal(ref, slot.raw_view(i, nbytes, torch.uint8)) for i in range(1, k)
                ):
                    raise ValueError(f"non-float tensor {p.key!r} differs between inputs")
                slot.result = slot.raw_view(0, nbytes, dtype)
                return
            ins = [slot.raw_view(i, nbytes, dtype) for i in range(len(files))]
            if whole:  # the method may hide a NaN (a trim): every input is checked first
                for t, src in zip(ins, files, strict=True):
                    if not is_finite(t):
                        raise _nonfinite_input(p.key, src.ckpt.folder)
            view = tuple(shape) if whole else (p.n,)
            xs = [slot.float32(i, t).view(view) for i, t in enumerate(ins)]
            kwargs = kwargs0 | ({"out": slot.out(p.n).view(view)} if takes_out else {})
            merged = spec.fn(xs[:k], weights, xs[k] if use_base else None, **kwargs)
            out = slot.as_dtype(merged, dtype)  # methods never write into their inputs
            if not is_finite(out):  # elementwise: an input's NaN/inf shows here, so blame it
                for t, src in zip(ins, files, strict=True):
                    if not is_finite(t):
                        raise _nonfinite_input(p.key, src.ckpt.folder)
                raise ValueError(f"{spec.name} {dict(params)} gave non-finite values in {p.key!r}")
            slot.result = out

        def write(p: _Piece, slot: _Slot) -> None:
            slot.pending.append(sink.write(p.shard, slot.result.contiguous()))

        reads: dict[int, Future] = {}
        writes: dict[int, Future] = {}

        def submit_read(m: int) -> None:
            if m >= len(pieces):
                return
            if m >= n_slots:  # the slot's last piece must be written and hashed
                writes.pop(m - n_slots).result()
                slots[m % n_slots].release()
            reads[m] = reader.submit(read, pieces[m], slots[m % n_slots])

        with tqdm(
            total=len(layout.tensors), desc=spec.name, unit="tensor", disable=not progress
        ) as bar:
            for m in range(depth):
                submit_read(m)
            for j, p in enumerate(pieces):
                submit_read(j + depth)
                reads.pop(j).result()
                merge(p, slots[j % n_slots])
                writes[j] = writer.submit(write, p, slots[j % n_slots])
                bar.update(p.last)
        for fut in writes.values():
            fut.result()
        for slot in slots:
            slot.release()
        out_digests = sink.finish()
        with ThreadPoolExecutor(k, thread_name_prefix="merge-digest-rest") as pool:
            in_digests = list(pool.map(CheckpointFiles.digests, files[:k]))
        return out_digests, in_digests
    finally:
        torch.set_num_threads(threads)
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)
        sink.close()
        for f in files:
            f.close()
