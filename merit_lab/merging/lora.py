"""LoRA branches merged exactly: θ0 + Σ_k w_k·s_k·B_k·A_k, never the product of averaged factors.

Input: θ0's HF folder and K peft LoRA adapters trained from it (``adapter_config.json`` +
``adapter_model.safetensors``, or a branch's ``final/`` holding one in ``adapter/``). Output: the
merged model as an HF folder in θ0's layout and dtype, written a tensor at a time, and one peft
adapter of rank Σ_k r_k that represents the same update (the A's stacked along the rank, the B's
weighted and concatenated; what peft's ``add_weighted_adapter(combination_type="cat")`` does).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from merit_lab.io import atomic_dir, atomic_write_json, atomic_write_text, read_json, sha256_file
from merit_lab.merging.stream import (
    MergeReport,
    check_same_base,
    merge_version,
    record_path,
    save_merge_manifest,
)
from merit_lab.models.checkpoints import (
    Checkpoint,
    copy_side_files,
    file_hashes,
    fingerprint_hashes,
    hash_thread,
    is_finite,
    write_shards,
)
from merit_lab.models.lora import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, adapter_folder

__all__ = [
    "LoraAdapter",
    "check_adapters",
    "lora_delta",
    "merge_lora",
    "save_lora_branch",
    "stack_adapters",
    "write_lora_model",
]

_PREFIX = "base_model.model."  # how peft names a wrapped model's modules in a saved adapter
_A, _B = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class LoraAdapter:
    """Header-level view of a saved plain-LoRA peft adapter.

    Attributes:
        folder: the adapter folder.
        config: its ``adapter_config.json``.
        rank: r; scale: s = alpha / r (alpha / sqrt(r) with ``use_rslora``).
        modules: θ0 weight key → (A key, B key) in ``adapter_model.safetensors``.
        shapes: θ0 weight key → (A shape (r, in), B shape (out, r)).
    """

    folder: Path
    config: Mapping[str, Any]
    rank: int
    scale: float
    modules: Mapping[str, tuple[str, str]]
    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]

    @classmethod
    def open(cls, path: str | Path) -> LoraAdapter:
        """Read the config and the weight file's header; a ValueError names what is not plain
        LoRA (DoRA, rank or alpha patterns, modules_to_save, bias, embedding LoRA)."""
        folder = adapter_folder(path)
        if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
            raise ValueError(f"{path}: no LoRA adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
        cfg = read_json(folder / ADAPTER_CONFIG)
        odd = [
            k
            for k, ok in [
                ("peft_type", cfg.get("peft_type") == "LORA"),
                ("use_dora", not cfg.get("use_dora")),
                ("rank_pattern", not cfg.get("rank_pattern")),
                ("alpha_pattern", not cfg.get("alpha_pattern")),
                ("modules_to_save", not cfg.get("modules_to_save")),
                ("bias", cfg.get("bias", "none") == "none"),
                ("lora_bias", not cfg.get("lora_bias")),
            ]
            if not ok
        ]
        if odd:
            raise ValueError(f"{folder}: only plain LoRA adapters merge exactly here; {odd} set")
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        with safe_open(folder / ADAPTER_WEIGHTS, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        modules, dims = {}, {}
        for key in shapes:
            if not (key.startswith(_PREFIX) and key.endswith((_A, _B))):
                raise ValueError(f"{folder}: tensor {key!r} is not a LoRA A or B weight")
            if key.endswith(_A):
                module = key[len(_PREFIX) : -len(_A)]
                b_key = _PREFIX + module + _B
                if b_key not in shapes:
                    raise ValueError(f"{folder}: {key!r} has no B matrix {b_key!r}")
                modules[module + ".weight"] = (key, b_key)
                dims[module + ".weight"] = (shapes[key], shapes[b_key])
        if 2 * len(modules) != len(shapes):
            raise ValueError(f"{folder}: B matrices without an A matrix")
        if any(a[0] != r or b[1] != r for a, b in dims.values()):
            raise ValueError(f"{folder}: a LoRA matrix has another rank than r = {r}")
        return cls(folder, cfg, r, scale, MappingProxyType(modules), MappingProxyType(dims))

    def factors(self, key: str) -> tuple[Tensor, Tensor]:
        """(A (r, in), B (out, r)) of θ0 weight ``key``, as stored."""
        a_key, b_key = self.modules[key]
        with safe_open(self.folder / ADAPTER_WEIGHTS, framework="pt") as f:
            a, b = f.get_tensor(a_key), f.get_tensor(b_key)
        if not (is_finite(a) and is_finite(b)):
            raise ValueError(f"{self.folder}: non-finite LoRA weights for {key!r}")
        return a, b

    def delta(self, key: str) -> Tensor:
        """ΔW = s·B·A of θ0 weight ``key`` in float64, in the weight's (out, in) layout."""
        a, b = self.factors(key)
        d = self.scale * (b.double() @ a.double())
        return d.T if self.config.get("fan_in_fan_out") else d


def lora_delta(adapters: Sequence[LoraAdapter], weights: Sequence[float], key: str) -> Tensor:
    """Σ_k w_k·s_k·B_k·A_k of θ0 weight ``key``, float64: the exact merged update."""
    out = weights[0] * adapters[0].delta(key)
    for ad, w in zip(adapters[1:], weights[1:], strict=True):
        out.add_(ad.delta(key), alpha=w)
    return out


def check_adapters(adapters: Sequence[LoraAdapter], base: Checkpoint) -> None:
    """Every adapter adapts the same θ0 weights, each of θ0's shape; else one ValueError."""
    ref = adapters[0]
    for ad in adapters[1:]:
        if set(ad.modules) != set(ref.modules):
            diff = sorted(set(ad.modules) ^ set(ref.modules))
            raise ValueError(
                f"{ad.folder} adapts other modules than {ref.folder} ({len(diff)} differ, e.g. "
                f"{diff[:3]}): train every branch with the same train.lora_target_modules"
            )
        if bool(ad.config.get("fan_in_fan_out")) != bool(ref.config.get("fan_in_fan_out")):
            raise ValueError(f"{ad.folder} and {ref.folder} differ in fan_in_fan_out")
    for ad in adapters:
        for key, (a_shape, b_shape) in ad.shapes.items():
            if key not in base.tensors:
                raise ValueError(
                    f"{ad.folder}: θ0 ({base.folder}) has no weight {key!r}; "
                    "the adapter was trained on another model"
                )
            shape = (b_shape[0], a_shape[1])
            shape = shape[::-1] if ad.config.get("fan_in_fan_out") else shape
            if tuple(base.tensors[key][2]) != shape:
                raise ValueError(
                    f"{ad.folder}: ΔW of {key!r} is {list(shape)}, θ0's weight is "
                    f"{list(base.tensors[key][2])}; the adapter was trained on another model"
                )


def write_lora_model(
    folder: Path,
    base: Checkpoint,
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    *,
    shard_size: int = 2**30,
    progress: bool = False,
) -> dict[str, str]:
    """Write θ0 + Σ_k w_k ΔW_k (float64 sums, θ0's dtype) into ``folder`` in θ0's layout, plus θ0's
    config and tokenizer files; θ0's other tensors are copied unchanged. Returns shard sha256s."""

    def produce(key: str) -> Tensor:
        t = base.read(key)  # θ0's own tensor: an untouched one is written back bit for bit
        if key not in adapters[0].modules:
            return t
        out = (t.double() + lora_delta(adapters, weights, key)).to(t.dtype)
        if not is_finite(out):
            raise ValueError(f"the LoRA merge gave non-finite values in {key!r}")
        return out

    with hash_thread("lora-hash") as (pool, _):
        digests = write_shards(
            folder,
            base,
            produce,
            shard_size=shard_size,
            hasher=pool,
            desc="lora merge",
            progress=progress,
        )
    copy_side_files(base.folder, folder)
    return digests


def stack_adapters(
    adapters: Sequence[LoraAdapter], weights: Sequence[float], folder: Path, *, base_name: str = ""
) -> dict[str, Any]:
    """Write one adapter of rank R = Σ_k r_k with B·A = Σ_k w_k s_k B_k A_k into ``folder``.

    A = [A_1; …; A_K] (R, in); B = [c_1 B_1, …, c_K B_K] (out, R) with c_k = w_k s_k / s and
    s = alpha / R = 1 (``lora_alpha`` = R, no rsLoRA). Stored in the inputs' dtype.

    Returns:
        Its ``adapter_config.json``.
    """
    rank = sum(ad.rank for ad in adapters)
    cfg = copy.deepcopy(dict(adapters[0].config))
    targets = sorted({k.rsplit(".", 2)[-2] for k in adapters[0].modules})
    cfg.update(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        target_modules=targets,
        rank_pattern={},
        alpha_pattern={},
    )
    if base_name:
        cfg["base_model_name_or_path"] = base_name
    tensors = {}
    for key, (a_key, b_key) in adapters[0].modules.items():
        a_parts, b_parts = [], []
        for ad, w in zip(adapters, weights, strict=True):
            a, b = ad.factors(key)
            a_parts.append(a.to(a_parts[0].dtype if a_parts else a.dtype))
            b_parts.append((w * ad.scale) * b.double())  # s = 1: c_k = w_k s_k
        tensors[a_key] = torch.cat(a_parts, dim=0).contiguous()
        tensors[b_key] = torch.cat(b_parts, dim=1).to(a_parts[0].dtype).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    atomic_write_json(folder / ADAPTER_CONFIG, cfg)
    return cfg


def _mergekit_or_reason(
    inputs: Sequence[Path], weights: Sequence[float], dtype: str, out_dir: Path, root
) -> tuple[dict | None, str | None]:
    """A mergekit ``linear`` config over the branches' dense models when every input holds one
    (Σ w_k θ_k = θ0 + Σ w_k ΔW_k since Σ w_k = 1), else the reason there is none."""
    dense = [p for p in inputs if any(p.glob("*.safetensors")) and (p / "config.json").is_file()]
    if len(dense) != len(inputs) or abs(sum(weights) - 1) > 1e-6:
        return None, (
            "mergekit has no merge that stacks LoRA adapters, and not every input holds its "
            "dense model (θ0 + s·B·A) for a linear merge over those"
        )
    out = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    models = [
        {"model": record_path(p, out_dir, root), "parameters": {"weight": w}}
        for p, w in zip(inputs, weights, strict=True)
    ]
    return {
        "merge_method": "linear",
        "models": models,
        "parameters": {"normalize": False},
        "dtype": "float32",
        "out_dtype": out.get(dtype, "float32"),
    }, None


def merge_lora(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    base: str | Path,
    weights: Sequence[float] | None = None,
    method: str = "linear",
    shard_size: int = 2**30,
    overwrite: bool = False,
    progress: bool = True,
    relative_root: str | Path | None = None,
):
    """Merge K LoRA branches exactly into the HF folder ``out_dir``: θ0 + Σ_k w_k·s_k·B_k·A_k.

    ``out_dir`` gets the merged model (θ0's layout and dtype; each weight summed in float64 and
    rounded once), ``adapter/`` (the same update as one rank-Σr_k peft adapter),
    ``merge_manifest.json`` (the fields of `merit_lab.merging.stream.merge_checkpoints`' plus
    ``lora``) and ``mergekit.yaml`` when the inputs hold their dense models (LoRA branches'
    ``final/`` do), else the manifest's ``mergekit_export`` says why there is none. Every check
    runs before anything is written; on an error nothing is left behind.

    Args:
        inputs: adapter folders, or LoRA branches' ``final/`` folders (adapter in ``adapter/``).
        base: θ0's folder, the one every adapter was trained from.
        weights: ``linear``: ≥ 0 and summing to 1 (token shares N_k / Σ N_j; default equal).
        method: ``linear`` or ``uniform`` (1/K each, no weights).
        relative_root: paths under this folder (the run's) are recorded relative to the file
            that records them: the manifest's and ``mergekit.yaml``'s to ``out_dir``, the stacked
            adapter's ``base_model_name_or_path`` to ``adapter/`` (`stream.record_path`).

    Returns:
        A `merit_lab.merging.stream.MergeReport`.
    """
    t0 = time.perf_counter()
    inputs, out_dir, base = [Path(p) for p in inputs], Path(out_dir), Path(base)
    if method not in ("linear", "uniform"):
        raise ValueError(
            f"LoRA branches merge exactly with linear or uniform, not {method!r}; "
            "other methods merge their dense models (merge_checkpoints)"
        )
    if not inputs:
        raise ValueError("no inputs to merge")
    if method == "uniform" and weights is not None:
        raise ValueError("method 'uniform' takes no weights; use method='linear'")
    w = [1.0 / len(inputs)] * len(inputs) if weights is None else [float(x) for x in weights]
    if len(w) != len(inputs) or min(w) < 0 or abs(sum(w) - 1) > 1e-6:
        raise ValueError(f"need {len(inputs)} weights >= 0 summing to 1, got {w}")
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir} already exists; pass overwrite=True to replace it")
    if out_dir.resolve() in {p.resolve() for p in [*inputs, base]}:
        raise ValueError(f"{out_dir} is one of the inputs; write the merge elsewhere")
    base_ckpt = Checkpoint.open(base)
    adapters = [LoraAdapter.open(p) for p in inputs]
    check_adapters(adapters, base_ckpt)
    base_hashes = file_hashes(base)
    base_fp = check_same_base(inputs, fingerprint_hashes(base_hashes))
    dtype0 = next(iter(base_ckpt.tensors.values()))[1]
    mk, why_not = _mergekit_or_reason(inputs, w, dtype0, out_dir, relative_root)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        digests = write_lora_model(
            tmp, base_ckpt, adapters, w, shard_size=shard_size, progress=progress
        )
        base_name = record_path(base, out_dir / ADAPTER_DIR, relative_root)  # θ0: absolute
        stacked = stack_adapters(adapters, w, tmp / ADAPTER_DIR, base_name=base_name)
        if mk is not None:
            atomic_write_text(tmp / "mergekit.yaml", yaml.safe_dump(mk, sort_keys=False))
        out_hashes = {
            p.relative_to(tmp).as_posix(): digests.get(p.name) or sha256_file(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        in_hashes = [
            {
                f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}"
                if ad.folder != p
                else ADAPTER_WEIGHTS: sha256_file(ad.folder / ADAPTER_WEIGHTS)
            }
            for p, ad in zip(inputs, adapters, strict=True)
        ]
        seconds = time.perf_counter() - t0
        manifest = {
            "method": method,
            "reference_url": "https://arxiv.org/abs/2106.09685",
            "weights": w,
            "params": {},
            "inputs": [
                {"path": record_path(p, out_dir, relative_root), "files": h}
                for p, h in zip(inputs, in_hashes, strict=True)
            ],
            "base": {"path": record_path(base, out_dir, relative_root), "files": base_hashes},
            "base_fingerprint": base_fp,
            "output": {"files": out_hashes, "n_tensors": len(base_ckpt.tensors), "dtype": dtype0},
            "lora": {
                "formula": "θ0 + Σ_k w_k s_k B_k A_k, float64 sums rounded once to θ0's dtype",
                "ranks": [ad.rank for ad in adapters],
                "scales": [ad.scale for ad in adapters],
                "modules": len(adapters[0].modules),
                "adapter": ADAPTER_DIR,
                "adapter_rank": stacked["r"],
            },
            "mergekit_export": "mergekit.yaml" if mk is not None else None,
            "mergekit_export_reason": why_not or "linear merge over the branches' dense models",
            "merit_lab_version": merge_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 3),
        }
        save_merge_manifest(tmp, manifest)
        bytes_written = sum((tmp / n).stat().st_size for n in digests)
    return MergeReport(
        out_dir=out_dir,
        method=method,
        weights=tuple(w),
        params=MappingProxyType({}),
        n_tensors=len(base_ckpt.tensors),
        bytes_written=bytes_written,
        seconds=seconds,
        input_sha256=tuple(MappingProxyType(h) for h in in_hashes),
        base_sha256=MappingProxyType(base_hashes),
        output_sha256=MappingProxyType(out_hashes),
        base_fingerprint=base_fp,
    )


def save_lora_branch(
    final: Path, model, base: str | Path, manifest_name: str, manifest: Mapping[str, Any]
) -> None:
    """Write a LoRA branch's ``final/``: the peft adapter in ``adapter/``, the dense model
    θ0 + s·B·A beside it (θ0's layout, dtype, config and tokenizer files: evaluation,
    diagnostics and full-model merges read it like any branch), then the manifest, atomically."""
    with atomic_dir(final, overwrite=True) as tmp:
        model.save_pretrained(tmp / ADAPTER_DIR)  # a PeftModel: adapter config + weights only
        write_lora_model(tmp, Checkpoint.open(base), [LoraAdapter.open(tmp)], [1.0])
        atomic_write_json(tmp / manifest_name, manifest)  # last: its presence marks final/ done
