"""Merge stage: K branch checkpoints (HF folders of safetensors) -> one merged HF model folder.

Streams every input through a registered merge method (`merit_lab.merging.methods`;
token-weighted `linear` by default) into safetensors shards (`merit_lab.merging.engine` reads,
merges, writes and digests), and records `merge_manifest.json` (in the versioned envelope, file
digests as `merit_lab.merging.digests` names them) plus an equivalent `mergekit.yaml`. Paths
under ``relative_root`` (a run's folder) are recorded relative to the merged folder (`record_path`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from merit_lab.envelope import load_enveloped, save_enveloped
from merit_lab.io import atomic_dir, atomic_write_text, read_json
from merit_lab.merging.digests import DEFAULT_DIGEST, file_digest, new_hasher
from merit_lab.merging.engine import PIECE, merge_into
from merit_lab.merging.methods import MERGE_METHODS, MergeMethod
from merit_lab.models.checkpoints import (
    Checkpoint,
    copy_side_files,
    file_hashes,
    fingerprint_checkpoint,
    fingerprint_hashes,
)

__all__ = [
    "MERGE_MANIFEST",
    "MergeReport",
    "check_same_base",
    "fingerprint_checkpoint",  # re-exported: it lives in merit_lab.models.checkpoints
    "load_merge_manifest",
    "merge_checkpoints",
    "merge_version",
    "mergekit_problem",
    "read_recorded_path",
    "record_path",
    "save_merge_manifest",
]

MERGE_MANIFEST = "merge_manifest.json"
# merge_manifest.json's header; manifests from before the envelope are read as version 1
MANIFEST_FORMAT = "merit-lab/merge-manifest"
MANIFEST_VERSION = 1
_MERGEKIT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


_SAME_ARCHITECTURE = "every input must have θ0's architecture: train the odd one again from θ0"


def _check_compatible(ckpts: Sequence[Checkpoint]) -> None:
    ref = ckpts[0]
    for c in ckpts[1:]:
        missing, extra = set(ref.tensors) - set(c.tensors), set(c.tensors) - set(ref.tensors)
        if missing or extra:
            raise ValueError(
                f"{c.folder} has other tensors than {ref.folder}: missing "
                f"{sorted(missing)[:5]} ({len(missing)} in all), extra {sorted(extra)[:5]} "
                f"({len(extra)} in all); {_SAME_ARCHITECTURE}"
            )
        for key, (_, dtype, shape) in ref.tensors.items():
            _, dtype_c, shape_c = c.tensors[key]
            if (dtype, shape) != (dtype_c, shape_c):
                raise ValueError(
                    f"tensor {key!r} is {dtype}{list(shape)} in {ref.folder} "
                    f"but {dtype_c}{list(shape_c)} in {c.folder}; {_SAME_ARCHITECTURE}"
                )


def check_same_base(inputs: Sequence[Path], base_fp: str | None) -> str | None:
    """Compare the inputs' recorded ``base_fingerprint``s with each other and with θ0's."""
    seen: dict[str, Path] = {}
    for p in inputs:
        record = read_json(p / "merit_branch.json") if (p / "merit_branch.json").is_file() else {}
        if (fp := record.get("base_fingerprint")) is None:
            continue
        if base_fp is not None and fp != base_fp:
            raise ValueError(
                f"{p} was trained from a different base: its merit_branch.json records "
                f"base_fingerprint {fp[:12]}…, the given base has {base_fp[:12]}…; train it "
                "again from this base (delete its folder), or merge with the base it had"
            )
        seen.setdefault(fp, p)
    if len(seen) > 1:
        pairs = ", ".join(f"{p} ({fp[:12]}…)" for fp, p in seen.items())
        raise ValueError(f"branches trained from different bases: {pairs}")
    return base_fp or next(iter(seen), None)


# ------------------------------------------------------------------------------------- writing
def record_path(path: str | Path, folder: str | Path, root: str | Path | None) -> str:
    """How a file in ``folder`` records ``path``: relative to ``folder`` (POSIX) when ``path``
    lies under ``root`` (a run's folder: the record stays true when the run moves), else
    absolute. Tools that read such a file (mergekit, peft) are run from ``folder``."""
    full = Path(path).resolve()
    if root is not None:
        top = Path(root).resolve()
        if full == top or top in full.parents:
            return Path(os.path.relpath(full, Path(folder).resolve())).as_posix()
    return str(full)


def read_recorded_path(value: str, folder: str | Path) -> Path:
    """The path a record in ``folder`` names (`record_path`): a relative one is taken from
    ``folder``; an absolute one is as it is."""
    return Path(value) if Path(value).is_absolute() else Path(folder) / value


def _mergekit_config(
    req: _Request, method: str, dtype: str, root: str | Path | None = None
) -> dict:
    inputs, weights, base, params = req.inputs, req.weights, req.base, req.params
    task_vector = method in ("task_arithmetic", "ties")
    models = [
        {
            "model": record_path(p, req.out_dir, root),
            "parameters": {"weight": w}
            | ({"density": params["density"]} if method == "ties" else {}),
        }
        for p, w in zip(inputs, weights, strict=True)
    ]
    cfg: dict[str, object] = {"merge_method": method if task_vector else "linear", "models": models}
    if task_vector:
        cfg["base_model"] = record_path(base, req.out_dir, root)  # type: ignore[arg-type]
        cfg["parameters"] = {"lambda": params["lambda"], "normalize": method == "ties"}
    else:
        cfg["parameters"] = {"normalize": False}  # our weights already sum to 1
    # we accumulate in float32 and write the inputs' dtype
    return cfg | {"dtype": "float32", "out_dtype": _MERGEKIT_DTYPES.get(dtype, "float32")}


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
    # file name -> digest (`merit_lab.merging.digests`: "xxh3_128:<hex>", or bare sha256 hex)
    input_sha256: tuple[Mapping[str, str], ...]  # per input: its weight files
    base_sha256: Mapping[str, str] | None  # θ0's weight files, always sha256
    output_sha256: Mapping[str, str]  # every output file except the manifest itself
    base_fingerprint: str | None  # the θ0 the branches share, from base or merit_branch.json


@dataclass(frozen=True)
class _Request:
    """A merge's arguments once resolved and checked against each other (not yet the files)."""

    inputs: list[Path]
    out_dir: Path
    base: Path | None
    spec: MergeMethod
    weights: list[float]
    params: dict[str, float]


def _check_request(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    method: str,
    weights: Sequence[float] | None,
    base: str | Path | None,
    params: Mapping[str, float] | None,
    overwrite: bool,
) -> _Request:
    inputs, out_dir = [Path(p) for p in inputs], Path(out_dir)
    base = Path(base) if base is not None else None
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; known: {sorted(MERGE_METHODS)}")
    spec = MERGE_METHODS[method]
    if not inputs:
        raise ValueError("no inputs to merge")
    if spec.needs_base and base is None:
        raise ValueError(f"method {method!r} needs base= (the θ0 the branches started from)")
    w, prm = spec.check_weights(weights, len(inputs)), spec.check_params(params)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir} already exists; pass overwrite=True to replace it")
    for p in [*inputs, *([base] if base is not None else [])]:
        if not p.is_dir():
            raise ValueError(f"{p} is not a folder")
        if p.resolve() == out_dir.resolve():
            raise ValueError(f"{out_dir} is one of the inputs; write the merge elsewhere")
    return _Request(inputs, out_dir, base, spec, w, prm)


def _open_inputs(req: _Request) -> tuple[list[Checkpoint], Checkpoint | None]:
    """Read every header and check what headers can tell before anything is written."""
    ckpts = [Checkpoint.open(p) for p in req.inputs]
    base_ckpt = Checkpoint.open(req.base) if req.base is not None else None
    _check_compatible([*ckpts, *([base_ckpt] if base_ckpt else [])])
    density = req.params.get("density")
    for key, (_, _, shape) in ckpts[0].tensors.items():
        if density is not None and int(density * math.prod(shape)) < 1:
            raise ValueError(f"density {density} keeps no entry of {key!r} {list(shape)}")
    return ckpts, base_ckpt


def save_merge_manifest(folder: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``folder/merge_manifest.json`` (the merge's facts under the envelope's header)."""
    return save_enveloped(
        Path(folder) / MERGE_MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION, manifest
    )


def load_merge_manifest(folder: str | Path) -> dict[str, Any]:
    """``merge_manifest.json`` of a merged folder (or the file itself): method, weights, params,
    input and output hashes. One of another format or a newer version is refused
    (`merit_lab.envelope.EnvelopeError`); one from before the envelope is read as version 1."""
    path = Path(folder)
    path = path / MERGE_MANIFEST if path.is_dir() else path
    return load_enveloped(path, MANIFEST_FORMAT, MANIFEST_VERSION, legacy=True)


def _manifest(
    req: _Request,
    in_hashes: Sequence[Mapping[str, str]],
    base_hashes: Mapping[str, str] | None,
    base_fp: str | None,
    out_hashes: Mapping[str, str],
    n_tensors: int,
    dtype: str,
    seconds: float,
    root: str | Path | None = None,
) -> dict:
    """``merge_manifest.json``: method, weights, every input's and output's file hashes."""
    return {
        "method": req.spec.name,
        "reference_url": req.spec.reference_url,
        "weights": req.weights,
        "params": req.params,
        "inputs": [
            {"path": record_path(p, req.out_dir, root), "files": h}
            for p, h in zip(req.inputs, in_hashes, strict=True)
        ],
        "base": req.base
        and {"path": record_path(req.base, req.out_dir, root), "files": base_hashes},
        "base_fingerprint": base_fp,
        "output": {"files": out_hashes, "n_tensors": n_tensors, "dtype": dtype},
        "merit_lab_version": merge_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
    }


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
    relative_root: str | Path | None = None,
    digest: str = DEFAULT_DIGEST,
    piece: int | None = PIECE,
) -> MergeReport:
    """Merge K HF checkpoints into the HF folder ``out_dir``, one tensor at a time.

    Every input byte is read once (`merit_lab.merging.engine`): elementwise methods go in
    pieces of ``piece`` entries, three in flight (memory ≈ 3 (K + 2) pieces, whatever the
    model), others a tensor at a time ((K + 2) copies of the largest tensor). Everything that
    headers can tell is checked before writing; on any error (also a non-finite value met
    mid-merge) neither ``out_dir`` nor a temp folder is left behind.

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
        relative_root: inputs and base under this folder (the run's) are recorded in
            ``merge_manifest.json`` and ``mergekit.yaml`` relative to ``out_dir``, so the
            records stay true when that folder moves (`record_path`); others absolute.
        digest: how the manifest digests the inputs' and outputs' files: ``xxh3_128`` (fast;
            recorded as ``"xxh3_128:<hex>"``) or ``sha256`` (bare hex, as before). θ0's files
            are always sha256: branches record θ0's sha256 fingerprint, which is checked.
        piece: entries per piece of an elementwise method (None: whole tensors; same bits).

    Returns:
        A `MergeReport`.
    """
    t0 = time.perf_counter()
    new_hasher(digest)  # an unknown digest is refused before anything else
    if piece is not None and not (isinstance(piece, int) and piece >= 1):
        raise ValueError(f"piece must be a positive number of entries or None, got {piece!r}")
    req = _check_request(inputs, out_dir, method, weights, base, params, overwrite)
    ckpts, base_ckpt = _open_inputs(req)
    base_hashes = file_hashes(req.base) if req.base is not None else None
    base_fp = check_same_base(req.inputs, fingerprint_hashes(base_hashes) if base_hashes else None)
    n_tensors, dtype0 = len(ckpts[0].tensors), next(iter(ckpts[0].tensors.values()))[1]

    # Every input byte is read once: merged, and digested from the same buffer on a thread of
    # its own; the output is digested from the bytes written (benchmarks/bench_merge.py).
    with atomic_dir(req.out_dir, overwrite=overwrite) as tmp:
        digests, in_hashes = merge_into(
            tmp,
            ckpts,
            base_ckpt,
            req.spec,
            req.weights,
            req.params,
            digest=digest,
            shard_size=shard_size,
            progress=progress,
            piece=piece,
        )
        copy_side_files(req.base if req.base is not None else req.inputs[0], tmp)
        why_not = mergekit_problem(req.inputs[0])
        if why_not is None:
            mk = _mergekit_config(req, method, dtype0, relative_root)
            atomic_write_text(tmp / "mergekit.yaml", yaml.safe_dump(mk, sort_keys=False))
        out_hashes = {
            p.name: digests.get(p.name) or file_digest(p, digest)
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        seconds = time.perf_counter() - t0
        manifest = _manifest(
            req,
            in_hashes,
            base_hashes,
            base_fp,
            out_hashes,
            n_tensors,
            dtype0,
            seconds,
            relative_root,
        )
        manifest["mergekit_export"] = None if why_not else "mergekit.yaml"
        manifest["mergekit_export_reason"] = why_not or "the same merge as a mergekit config"
        save_merge_manifest(tmp, manifest)
        bytes_written = sum((tmp / n).stat().st_size for n in digests)
    return MergeReport(
        out_dir=req.out_dir,
        method=method,
        weights=tuple(req.weights),
        params=MappingProxyType(req.params),
        n_tensors=n_tensors,
        bytes_written=bytes_written,
        seconds=seconds,
        input_sha256=tuple(MappingProxyType(h) for h in in_hashes),
        base_sha256=MappingProxyType(base_hashes) if base_hashes is not None else None,
        output_sha256=MappingProxyType(out_hashes),
        base_fingerprint=base_fp,
    )


def mergekit_problem(folder: str | Path) -> str | None:
    """Why mergekit cannot redo a merge of this model (None when it can): mergekit 0.1.5 reads
    ``num_hidden_layers`` at the top of ``config.json``, where transformers 5 no longer writes it
    for image-text models (it is under ``text_config``), so ``mergekit-yaml`` stops with "has no
    attribute num_hidden_layers" (checked on the image-text demo's Qwen2-VL)."""
    config = Path(folder) / "config.json"
    cfg = read_json(config) if config.is_file() else {}
    if "num_hidden_layers" not in cfg and "num_hidden_layers" in cfg.get("text_config", {}):
        return (
            f"{cfg.get('model_type', 'this')} config keeps num_hidden_layers under text_config "
            "(transformers 5), which mergekit 0.1.5 does not read: no mergekit.yaml written"
        )
    return None


def merge_version() -> str:
    """merit-lab's installed version, as merge manifests record it."""
    try:
        return metadata.version("merit-lab")
    except metadata.PackageNotFoundError:
        return "unknown"
