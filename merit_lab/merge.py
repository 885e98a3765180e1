"""Merge stage: K branch checkpoints (HF folders of safetensors) -> one merged HF model folder.

Streams one tensor at a time from every input through a registered merge method (token-weighted
`linear` by default), writes safetensors shards + index the way `save_pretrained` does, copies
config/tokenizer files, and records `merge_manifest.json` plus an equivalent `mergekit.yaml`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import keyword
import math
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from types import MappingProxyType

import torch
import yaml
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from merit_lab.io import atomic_dir, atomic_write_json, atomic_write_text, read_json, sha256_file

__all__ = [
    "MERGE_METHODS",
    "MergeMethod",
    "MergeReport",
    "fingerprint_checkpoint",
    "merge_checkpoints",
    "merge_linear",
    "merge_method",
    "merge_task_arithmetic",
    "merge_ties",
    "merge_uniform",
]

INDEX_NAME = "model.safetensors.index.json"
# What from_pretrained / AutoTokenizer / AutoProcessor read besides the weights, copied from θ0
# (or the first input). merit_branch.json describes one branch, so it is not copied.
_SIDE_FILES = (  # noqa: SIM905  (a list of 13 names would take 15 lines)
    "config.json generation_config.json tokenizer.json tokenizer_config.json tokenizer.model "
    "special_tokens_map.json added_tokens.json vocab.json merges.txt chat_template.json "
    "preprocessor_config.json processor_config.json video_preprocessor_config.json"
).split()
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
Tensors = Sequence[Tensor]  # the K inputs' values of one parameter, float32, same shape
_MERGEKIT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


# ------------------------------------------------------------------------------------ registry
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


MERGE_METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    reference_url: str,
    needs_base: bool = False,
    weight_rule: str = "free",
    defaults: Mapping[str, float] | None = None,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register the decorated function in `MERGE_METHODS` under ``name``."""

    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        frozen = MappingProxyType(dict(defaults or {}))
        MERGE_METHODS[name] = MergeMethod(name, fn, reference_url, needs_base, weight_rule, frozen)
        return fn

    return register


@merge_method("linear", reference_url="https://arxiv.org/abs/2203.05482", weight_rule="convex")
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


@merge_method("uniform", reference_url="https://arxiv.org/abs/2203.05482", weight_rule="equal")
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


# ------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class _Checkpoint:
    """Header-only view of an HF model folder: each tensor's file, dtype and shape."""

    folder: Path
    tensors: Mapping[str, tuple[str, str, tuple[int, ...]]]  # key -> (file, dtype, shape)

    @classmethod
    def open(cls, folder: Path) -> _Checkpoint:
        if (folder / INDEX_NAME).is_file():
            files = sorted(set(read_json(folder / INDEX_NAME)["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ValueError(f"{folder}: no model.safetensors or {INDEX_NAME}")
        tensors = {}
        for name in files:
            if not (folder / name).is_file():
                raise ValueError(f"{folder}: {INDEX_NAME} names a missing file {name}")
            with safe_open(folder / name, framework="pt") as f:
                for key in f.offset_keys():  # the order save_pretrained wrote: layer by layer
                    dtype, shape = f.get_slice(key).get_dtype(), tuple(f.get_slice(key).get_shape())
                    if dtype not in _DTYPES:
                        raise ValueError(f"{folder / name}: unsupported dtype {dtype} of {key!r}")
                    tensors[key] = (name, dtype, shape)
        return cls(folder, tensors)

    def read(self, key: str) -> Tensor:
        """Load one tensor. The file is opened per tensor on purpose: safe_open maps it, and
        mapped pages stay resident while it is open, so handles held for the whole merge would
        lift peak RSS towards the size of all inputs (measured: 1240 vs 481 MiB)."""
        with safe_open(self.folder / self.tensors[key][0], framework="pt") as f:
            t = f.get_tensor(key)
        if t.is_floating_point() and not _is_finite(t):
            raise ValueError(f"tensor {key!r} has non-finite values in {self.folder}")
        return t

    def nbytes(self, key: str) -> int:
        _, dtype, shape = self.tensors[key]
        return math.prod(shape) * _DTYPES[dtype].itemsize


def _is_finite(t: Tensor) -> bool:
    # NaN and ±inf both surface in min/max; isfinite(t).all() would allocate a full bool mask
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi)) if t.numel() else True


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in _weight_files(folder)}


def _sha256_stoppable(path: Path, stop: threading.Event, chunk: int = 1 << 20) -> str:
    """`sha256_file` through one reused buffer (no allocation per chunk); gives up (returning
    "") once ``stop`` is set, so a failed merge does not wait for the hashing of its inputs."""
    h, buf = hashlib.sha256(), bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if stop.is_set():
                return ""
            h.update(view[:n])
    return h.hexdigest()


@contextlib.contextmanager
def _hash_thread(name: str) -> Iterator[tuple[ThreadPoolExecutor, threading.Event]]:
    """One worker thread for sha256 work (hashlib releases the GIL on big buffers, so it runs
    beside the merge); on exit, pending jobs are cancelled and a running one stops."""
    stop = threading.Event()
    pool = ThreadPoolExecutor(1, thread_name_prefix=name)
    try:
        yield pool, stop
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _fingerprint(hashes: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for name, digest in sorted(hashes.items()):
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()


def fingerprint_checkpoint(folder: str | Path) -> str:
    """sha256 over the sorted (file name, sha256) pairs of the folder's ``*.safetensors`` files.

    Branch training records it as ``base_fingerprint`` in ``merit_branch.json`` so that the
    merge can refuse branches that started from another θ0. Re-sharding θ0 changes it.
    """
    hashes = _file_hashes(Path(folder))
    if not hashes:
        raise ValueError(f"{folder}: no .safetensors files to fingerprint")
    return _fingerprint(hashes)


# ---------------------------------------------------------------------------------- validation
def _resolve_weights(spec: MergeMethod, weights: Sequence[float] | None, k: int) -> list[float]:
    if spec.weight_rule == "equal":
        if weights is not None:
            raise ValueError(f"method {spec.name!r} takes no weights; use method='linear'")
        return [1.0 / k] * k
    if weights is None:
        return [1.0 / k] * k if spec.weight_rule == "convex" else [1.0] * k
    w = [float(x) for x in weights]
    if len(w) != k:
        raise ValueError(f"got {len(w)} weights for {k} inputs")
    if not all(map(math.isfinite, w)):
        raise ValueError(f"weights must be finite, got {w}")
    if spec.weight_rule == "convex" and (min(w) < 0 or abs(sum(w) - 1.0) > 1e-6):
        raise ValueError(f"method {spec.name!r} needs weights >= 0 summing to 1, got {w}")
    return w


def _resolve_params(spec: MergeMethod, params: Mapping[str, float] | None) -> dict[str, float]:
    params = dict(params or {})
    if unknown := sorted(set(params) - set(spec.defaults)):
        raise ValueError(f"method {spec.name!r} takes {sorted(spec.defaults)}, not {unknown}")
    out = {k: float(params.get(k, v)) for k, v in spec.defaults.items()}
    if not all(map(math.isfinite, out.values())):
        raise ValueError(f"parameters must be finite, got {out}")
    if not 0.0 < out.get("density", 1.0) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {out['density']}")
    return out


def _check_compatible(ckpts: Sequence[_Checkpoint]) -> None:
    ref = ckpts[0]
    for c in ckpts[1:]:
        missing, extra = set(ref.tensors) - set(c.tensors), set(c.tensors) - set(ref.tensors)
        if missing or extra:
            raise ValueError(
                f"{c.folder} has other tensors than {ref.folder}: missing "
                f"{sorted(missing)[:5]} ({len(missing)} in all), extra {sorted(extra)[:5]} "
                f"({len(extra)} in all)"
            )
        for key, (_, dtype, shape) in ref.tensors.items():
            _, dtype_c, shape_c = c.tensors[key]
            if (dtype, shape) != (dtype_c, shape_c):
                raise ValueError(
                    f"tensor {key!r} is {dtype}{list(shape)} in {ref.folder} "
                    f"but {dtype_c}{list(shape_c)} in {c.folder}"
                )


def _check_same_base(inputs: Sequence[Path], base_fp: str | None) -> str | None:
    """Compare the inputs' recorded ``base_fingerprint``s with each other and with θ0's."""
    seen: dict[str, Path] = {}
    for p in inputs:
        record = read_json(p / "merit_branch.json") if (p / "merit_branch.json").is_file() else {}
        if (fp := record.get("base_fingerprint")) is None:
            continue
        if base_fp is not None and fp != base_fp:
            raise ValueError(
                f"{p} was trained from a different base: its merit_branch.json records "
                f"base_fingerprint {fp[:12]}…, the given base has {base_fp[:12]}…"
            )
        seen.setdefault(fp, p)
    if len(seen) > 1:
        pairs = ", ".join(f"{p} ({fp[:12]}…)" for fp, p in seen.items())
        raise ValueError(f"branches trained from different bases: {pairs}")
    return base_fp or next(iter(seen), None)


# ------------------------------------------------------------------------------------- writing
def _plan_shards(ckpt: _Checkpoint, shard_size: int) -> list[list[str]]:
    """Greedy in key order like huggingface_hub's splitter; a tensor over the limit goes alone."""
    shards: list[list[str]] = [[]]
    size = 0
    for key in ckpt.tensors:
        if shards[-1] and size + ckpt.nbytes(key) > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += ckpt.nbytes(key)
    return shards


def _shard_header(keys: Sequence[str], ckpt: _Checkpoint) -> bytes:
    """A safetensors header for ``keys`` in this order; the data follows it back to back."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}  # transformers checks it
    offset = 0
    for key in keys:
        _, dtype, shape = ckpt.tensors[key]
        end = offset + ckpt.nbytes(key)
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


def _mergekit_config(
    inputs: Sequence[Path], weights: Sequence[float], base: Path | None, method: str,
    params: Mapping[str, float], dtype: str,
) -> dict:  # fmt: skip
    task_vector = method in ("task_arithmetic", "ties")
    models = [
        {"model": str(p.resolve()), "parameters": {"weight": w} | (
            {"density": params["density"]} if method == "ties" else {}
        )}
        for p, w in zip(inputs, weights, strict=True)
    ]  # fmt: skip
    cfg: dict[str, object] = {"merge_method": method if task_vector else "linear", "models": models}
    if task_vector:
        cfg["base_model"] = str(base.resolve())  # type: ignore[union-attr]
        cfg["parameters"] = {"lambda": params["lambda"], "normalize": method == "ties"}
    else:
        cfg["parameters"] = {"normalize": False}  # our weights already sum to 1
    # we accumulate in float32 and write the inputs' dtype
    return cfg | {"dtype": "float32", "out_dtype": _MERGEKIT_DTYPES.get(dtype, "float32")}


class _Workspace:
    """Two float32 buffers, taken in turn, for the results of methods that accept ``out=``.

    A fresh allocation per tensor page-faults all of it in again, which costs about 5× the
    arithmetic of a linear merge (measured on 128 MiB tensors); reused buffers fault once. Two,
    because a written result may still be being hashed while the next one is computed: the
    caller must let go of a result before taking the buffer after next (`_write_weights` waits
    for each tensor's hash before it submits the next one's).
    """

    def __init__(self, numel: int) -> None:
        self.numel, self.bufs, self.turn = numel, [None, None], 0

    def take(self, shape: Sequence[int]) -> Tensor:
        self.turn ^= 1
        if self.bufs[self.turn] is None:  # untouched pages cost nothing until written
            self.bufs[self.turn] = torch.empty(self.numel, dtype=torch.float32)
        return self.bufs[self.turn][: math.prod(shape)].view(tuple(shape))


def _merge_tensor(
    key: str, ckpts: Sequence[_Checkpoint], base: _Checkpoint | None, spec: MergeMethod,
    weights: Sequence[float], params: Mapping[str, float], ws: _Workspace | None = None,
) -> Tensor:  # fmt: skip
    """Load ``key`` from every input (and θ0), merge in float32, return it in the inputs' dtype.

    With ``ws`` (only for methods that take ``out=``) the float32 result lives in ``ws``.
    """
    ts = [c.read(key) for c in ckpts]
    if not ts[0].is_floating_point():
        if any(not torch.equal(ts[0], t) for t in ts[1:]):
            raise ValueError(f"non-float tensor {key!r} differs between inputs")
        return ts[0]  # integer buffers cannot be averaged; equal ones are kept
    dtype, ts = ts[0].dtype, [t.float() for t in ts]
    b = base.read(key).float() if base is not None else None
    kwargs = {(k + "_" if keyword.iskeyword(k) else k): v for k, v in params.items()}  # lambda
    if ws is not None:
        kwargs["out"] = ws.take(ts[0].shape)
    out = spec.fn(ts, weights, b, **kwargs).to(dtype)
    if not _is_finite(out):
        raise ValueError(f"{spec.name} {dict(params)} gave non-finite values in {key!r}")
    return out


def _write_weights(
    tmp: Path, ckpts: Sequence[_Checkpoint], base: _Checkpoint | None, spec: MergeMethod,
    weights: Sequence[float], params: Mapping[str, float], shard_size: int, progress: bool,
    hasher: ThreadPoolExecutor,
) -> dict[str, str]:  # fmt: skip
    """Merge tensor by tensor straight into shard files; write the index if there are several.

    Returns each shard's sha256, computed on ``hasher``'s thread from the very bytes handed to
    ``write`` while the next tensor is merged (re-reading the file would only read back the same
    page cache). At most one written tensor waits for its hash, so memory stays ≈ (K + 2) copies
    of the largest tensor.
    """
    ref, shards = ckpts[0], _plan_shards(ckpts[0], shard_size)
    n = len(shards)
    try:
        takes_out = "out" in inspect.signature(spec.fn).parameters
    except (TypeError, ValueError):  # a callable without a signature: no ``out=``
        takes_out = False
    ws = _Workspace(max(math.prod(t[2]) for t in ref.tensors.values())) if takes_out else None
    names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    names = names if n > 1 else ["model.safetensors"]
    digests: dict[str, str] = {}
    pending: Future | None = None
    with tqdm(total=len(ref.tensors), desc=spec.name, unit="tensor", disable=not progress) as bar:
        for name, keys in zip(names, shards, strict=True):
            h = hashlib.sha256()
            with open(tmp / name, "wb") as f:
                header = _shard_header(keys, ref)
                f.write(header)
                h.update(header)
                for key in keys:
                    out = _merge_tensor(key, ckpts, base, spec, weights, params, ws)
                    data = out.contiguous().reshape(-1).view(torch.uint8).numpy()  # no copy
                    f.write(data)
                    if pending is not None:
                        pending.result()  # the previous tensor's bytes are hashed: let them go
                    pending = hasher.submit(h.update, data)  # FIFO: file order is kept
                    bar.update()
                f.flush()
                os.fsync(f.fileno())
            if pending is not None:
                pending.result()
                pending = None
            digests[name] = h.hexdigest()
    if n > 1:
        index = {
            "metadata": {
                "total_parameters": sum(math.prod(t[2]) for t in ref.tensors.values()),
                "total_size": sum(map(ref.nbytes, ref.tensors)),
            },
            "weight_map": {k: name for name, keys in zip(names, shards, strict=True) for k in keys},
        }
        atomic_write_json(tmp / INDEX_NAME, index)
    return digests


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in [*_SIDE_FILES, *(p.name for p in sorted(src.glob("*.jinja")))]:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if (src / "additional_chat_templates").is_dir():
        shutil.copytree(src / "additional_chat_templates", dst / "additional_chat_templates")


# ----------------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class MergeReport:
    """What `merge_checkpoints` wrote and from what (the same facts as ``merge_manifest.json``)."""

    out_dir: Path
    method: str
    weights: tuple[float, ...]
    params: Mapping[str, float]
    n_tensors: int
    bytes_written: int  # weight shards only
    seconds: float
    input_sha256: tuple[Mapping[str, str], ...]  # per input: weight file name -> sha256
    base_sha256: Mapping[str, str] | None
    output_sha256: Mapping[str, str]  # every output file except the manifest itself
    base_fingerprint: str | None  # the θ0 the branches share, from base or merit_branch.json


def merge_checkpoints(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    base: str | Path | None = None,
    params: Mapping[str, float] | None = None,
    shard_size: int = 2**30,
    overwrite: bool = False,
    progress: bool = True,
) -> MergeReport:
    """Merge K HF checkpoints into the HF folder ``out_dir``, one tensor at a time.

    Peak memory is about (K + 2) float32 copies of the largest tensor. Everything that headers
    can tell is checked before writing; on any error (also a non-finite value met mid-merge)
    neither ``out_dir`` nor a temp folder is left behind.

    Args:
        inputs: branch folders (``model.safetensors``, or shards + index).
        out_dir: the folder to create.
        method: a key of `MERGE_METHODS`: ``linear``, ``uniform``, ``task_arithmetic``, ``ties``.
        weights: one per input. ``linear``: ≥ 0 summing to 1, normally the partition's token
            weights (default: equal). ``uniform``: none. Task-vector methods: default 1 each.
        base: θ0's folder, needed by task-vector methods. Config/tokenizer files are copied
            from it (else from the first input); branches' ``base_fingerprint`` must match it.
        params: method parameters, mergekit names: ``lambda``; ``density`` for ties.
        shard_size: most bytes of tensor data per output shard (a bigger tensor goes alone).
        overwrite: replace an existing ``out_dir``.
        progress: show a tqdm bar over tensors.

    Returns:
        A `MergeReport`.
    """
    t0 = time.perf_counter()
    inputs, out_dir = [Path(p) for p in inputs], Path(out_dir)
    base = Path(base) if base is not None else None
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; known: {sorted(MERGE_METHODS)}")
    spec = MERGE_METHODS[method]
    if not inputs:
        raise ValueError("no inputs to merge")
    if spec.needs_base and base is None:
        raise ValueError(f"method {method!r} needs base= (the θ0 the branches started from)")
    w, prm = _resolve_weights(spec, weights, len(inputs)), _resolve_params(spec, params)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir} already exists; pass overwrite=True to replace it")
    sources = [*inputs, *([base] if base is not None else [])]
    for p in sources:
        if not p.is_dir():
            raise ValueError(f"{p} is not a folder")
        if p.resolve() == out_dir.resolve():
            raise ValueError(f"{out_dir} is one of the inputs; write the merge elsewhere")
    ckpts = [_Checkpoint.open(p) for p in inputs]
    base_ckpt = _Checkpoint.open(base) if base is not None else None
    _check_compatible([*ckpts, *([base_ckpt] if base_ckpt else [])])
    for key, (_, _, shape) in ckpts[0].tensors.items():
        if "density" in prm and int(prm["density"] * math.prod(shape)) < 1:
            raise ValueError(f"density {prm['density']} keeps no entry of {key!r} {list(shape)}")
    base_hashes = _file_hashes(base) if base is not None else None
    base_fp = _check_same_base(inputs, _fingerprint(base_hashes) if base_hashes else None)
    dtype0 = next(iter(ckpts[0].tensors.values()))[1]

    # The inputs' sha256 (for the manifest) is computed on a thread beside the merge, and the
    # output's while it is written: hashing is as costly as the merge itself, so done in series
    # it would double the time (measured by benchmarks/bench_merge.py).
    with (
        _hash_thread("merge-hash-inputs") as (in_pool, stop),
        _hash_thread("merge-hash-output") as (out_pool, _),
        atomic_dir(out_dir, overwrite=overwrite) as tmp,
    ):
        in_jobs = [
            {f.name: in_pool.submit(_sha256_stoppable, f, stop) for f in _weight_files(p)}
            for p in inputs
        ]
        digests = _write_weights(
            tmp, ckpts, base_ckpt, spec, w, prm, shard_size, progress, out_pool
        )
        names = list(digests)
        _copy_side_files(base if base is not None else inputs[0], tmp)
        mk = _mergekit_config(inputs, w, base, method, prm, dtype0)
        atomic_write_text(tmp / "mergekit.yaml", yaml.safe_dump(mk, sort_keys=False))
        out_hashes = {
            p.name: digests.get(p.name) or sha256_file(p)
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        in_hashes = [{name: job.result() for name, job in jobs.items()} for jobs in in_jobs]
        seconds = time.perf_counter() - t0
        manifest = {
            "method": method,
            "reference_url": spec.reference_url,
            "weights": w,
            "params": prm,
            "inputs": [
                {"path": str(p.resolve()), "files": h}
                for p, h in zip(inputs, in_hashes, strict=True)
            ],
            "base": base and {"path": str(base.resolve()), "files": base_hashes},
            "base_fingerprint": base_fp,
            "output": {"files": out_hashes, "n_tensors": len(ckpts[0].tensors), "dtype": dtype0},
            "merit_lab_version": _version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 3),
        }
        atomic_write_json(tmp / "merge_manifest.json", manifest)
        bytes_written = sum((tmp / n).stat().st_size for n in names)
    return MergeReport(
        out_dir=out_dir,
        method=method,
        weights=tuple(w),
        params=MappingProxyType(prm),
        n_tensors=len(ckpts[0].tensors),
        bytes_written=bytes_written,
        seconds=seconds,
        input_sha256=tuple(MappingProxyType(h) for h in in_hashes),
        base_sha256=MappingProxyType(base_hashes) if base_hashes is not None else None,
        output_sha256=MappingProxyType(out_hashes),
        base_fingerprint=base_fp,
    )


def _version() -> str:
    try:
        return metadata.version("merit-lab")
    except metadata.PackageNotFoundError:
        return "unknown"
