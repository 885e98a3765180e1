"""The gradient bank: T sketched source gradients at θ0, its per-source parts and its key.

Input: rows from `merit_lab.gradients.estimate` (or parts written by its workers). Output: a
`GradientBank` saved as ``bank.safetensors`` (the rows) + ``bank.json`` (names, info, stats, in
the versioned envelope), and ``parts/``: one file per finished source, reused while its key holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from merit_lab.envelope import load_enveloped, save_enveloped
from merit_lab.gradients.sketch import SketchSpec
from merit_lab.io import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["BankParts", "GradientBank", "bank_key", "read_part", "request_info"]

BANK_FORMAT = "merit-lab/gradient-bank"  # bank.json; files from before the envelope read as v1
BANK_VERSION = 1


@dataclass(frozen=True)
class GradientBank:
    """T sketched source gradients at θ0.

    Attributes:
        names: source names, one per row.
        rows: (T, d) float32 sketched gradients of the mean response-token loss.
        info: what the rows depend on: model, parameter selection, sketch spec, n, max_length.
        stats: per source: examples and response tokens used, loss at θ0, exact gradient norm.
    """

    names: tuple[str, ...]
    rows: np.ndarray
    info: Mapping[str, Any] = field(default_factory=dict)
    stats: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def row(self, name: str) -> np.ndarray:
        """The (d,) row of source ``name``."""
        return self.rows[self.names.index(name)]

    def select(self, names: Sequence[str]) -> GradientBank:
        """The bank restricted to ``names``, in that order."""
        idx = [self.names.index(n) for n in names]
        return GradientBank(
            tuple(names), self.rows[idx], self.info, {n: self.stats[n] for n in names}
        )

    def save(self, folder: str | Path) -> Path:
        """Write ``bank.safetensors`` (the rows) and ``bank.json`` atomically into ``folder``."""
        folder = Path(folder)
        payload = save_safetensors({"rows": torch.from_numpy(np.ascontiguousarray(self.rows))})
        atomic_write_bytes(folder / "bank.safetensors", payload)
        meta = {"names": list(self.names), "info": dict(self.info), "stats": dict(self.stats)}
        save_enveloped(folder / "bank.json", BANK_FORMAT, BANK_VERSION, meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> GradientBank:
        """Read a saved bank; a cut, corrupt or inconsistent one raises a ValueError naming
        the file and how to rebuild it (the finished sources in ``parts/`` are reused); a
        ``bank.json`` of another format or a newer version is refused (`EnvelopeError`)."""
        folder = Path(folder)
        meta = load_enveloped(folder / "bank.json", BANK_FORMAT, BANK_VERSION, legacy=True)
        redo = (
            f"delete {folder}/bank.safetensors and bank.json and run the gradients stage "
            "again: the finished sources in parts/ are reused"
        )
        try:
            with safe_open(folder / "bank.safetensors", framework="pt") as f:
                rows = f.get_tensor("rows").numpy()
        except Exception as e:  # SafetensorError (a cut file), OSError, a missing "rows"
            raise ValueError(
                f"{folder}/bank.safetensors: not a readable safetensors file ({e}); {redo}"
            ) from e
        if rows.shape[0] != len(meta["names"]):
            raise ValueError(
                f"{folder}: {rows.shape[0]} rows but {len(meta['names'])} names; {redo}"
            )
        finite = np.isfinite(rows).all(axis=1)
        bad = [n for n, ok in zip(meta["names"], finite, strict=True) if not ok]
        if bad:
            raise ValueError(
                f"{folder}/bank.safetensors: non-finite values in the rows of {bad}; {redo}"
            )
        return cls(tuple(meta["names"]), rows, meta["info"], meta["stats"])


def bank_key(info: Mapping[str, Any]) -> str:
    """A short hash of the bank info (what the rows depend on): equal info, equal key."""
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


class BankParts:
    """The finished sources of an interrupted or smaller bank: one file each in ``folder``.

    A part is reused only when its key matches: the bank's key and the source's own key (its
    examples' content), so another model, sketch or edited source is computed again.
    """

    def __init__(self, folder: Path, bank: str, source_keys: Mapping[str, str]) -> None:
        self.folder, self.bank_key, self.source_keys = Path(folder), bank, dict(source_keys)

    def path(self, name: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        return self.folder / f"{safe}-{digest}.safetensors"

    def key(self, name: str) -> str:
        return bank_key({"bank": self.bank_key, "source": self.source_keys.get(name, "")})

    def read(self, name: str) -> tuple[np.ndarray, dict] | None:
        """(row (d,), stats) of a finished source, or None when absent or stale."""
        if not self.path(name).exists():
            return None
        try:
            with safe_open(self.path(name), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != self.key(name):
                    return None
                return f.get_tensor("row").numpy(), json.loads(meta["stats"])
        except Exception as e:  # a part cut short (a killed copy): it is a cache, so redo it
            log.warning("%s: unreadable (%s); computing source %r again", self.path(name), e, name)
            return None

    def write(self, name: str, row: np.ndarray, stats: Mapping[str, Any]) -> None:
        meta = {"key": self.key(name), "source": name, "stats": json.dumps(stats)}
        payload = save_safetensors({"row": torch.from_numpy(row)}, metadata=meta)
        atomic_write_bytes(self.path(name), payload)


def read_part(
    out_dir: str | Path, name: str, info: Mapping[str, Any], source_keys: Mapping[str, str]
) -> tuple[np.ndarray, dict] | None:
    """(row, stats) of source ``name`` from ``out_dir/parts/`` when current for the bank
    ``info`` and the source's key, else None."""
    return BankParts(Path(out_dir) / "parts", info["key"], source_keys).read(name)


def request_info(
    *,
    sketch: SketchSpec,
    n: int,
    max_length: int,
    long_examples: str,
    preset: str = "all",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    model_fingerprint: str = "",
    lora: Mapping[str, Any] | None = None,
    **_: Any,
) -> dict[str, Any]:
    """The bank-info fields fixed by the request alone, before θ0 is loaded (a launcher uses
    them to find the parts of an earlier launch it can reuse). Extra keyword arguments (the
    micro-batching, checkpointing) change no row and are ignored. ``lora``: the warmed-up
    adapter the rows are taken on (`merit_lab.gradients.lora_bank.warmup_info`), recorded when
    given."""
    return ({"lora": dict(lora)} if lora else {}) | {
        "model": model_fingerprint,
        "parameters": {
            "preset": preset,
            "include": list(include or []),
            "exclude": list(exclude or []),
        },
        "sketch": sketch.to_dict(),
        "n": n,
        "max_length": max_length,
        "long_examples": long_examples,
        "loss": "mean response-token cross-entropy over the calibration examples",
    }
