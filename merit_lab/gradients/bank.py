"""The gradient bank: T sketched source gradients at θ0, its per-source parts and its key.

Input: rows from `merit_lab.gradients.estimate` (or parts written by its workers). Output: a
`GradientBank` saved as ``bank.safetensors`` (the rows) + ``bank.json`` (names, info, stats, in
the versioned envelope), ``folds.safetensors`` (the fold rows, when computed) and ``parts/``: one
file per finished source, reused while its key holds. `map_rows` maps the rows of a saved bank
without reading them (a bank larger than memory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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

__all__ = [
    "FOLDS_FILE",
    "BankParts",
    "GradientBank",
    "bank_key",
    "map_rows",
    "read_part",
    "request_info",
]

FOLDS_FILE = "folds.safetensors"  # beside bank.safetensors: (T, m, d) fold rows, (T, m) tokens
# A source's stats that describe its fold rows (`estimate._sketch_source`): dropped where its
# part is reused for its row alone, in a bank without fold rows.
FOLD_STATS = ("fold_tokens", "fold_seconds", "fold_batching", "micro_batches")
BANK_FORMAT = "merit-lab/gradient-bank"  # bank.json; files from before the envelope read as v1
BANK_VERSION = 1
_CHECK_ROWS_BYTES = 2**26  # a mapped bank is checked and hashed this many bytes of rows at a time


@dataclass(frozen=True)
class GradientBank:
    """T sketched source gradients at θ0.

    Attributes:
        names: source names, one per row.
        rows: (T, d) float32 sketched gradients of the mean response-token loss.
        info: what the rows depend on: model, parameter selection, sketch spec, n, max_length.
        stats: per source: examples and response tokens used, loss at θ0, exact gradient norm.
        folds: (T, m, d) float32 fold rows, or None (``calibration.folds`` 1): row f of source
            t is the gradient of the mean loss over fold f alone (its calibration examples
            i ≡ f mod m), so ``rows[t] == Σ_f fold_tokens[t, f] · folds[t, f] / Σ_f
            fold_tokens[t, f]`` to float rounding. `load` memory-maps it: nothing is read
            until it is used.
        fold_tokens: (T, m) int64 response tokens of each fold, or None.
    """

    names: tuple[str, ...]
    rows: np.ndarray
    info: Mapping[str, Any] = field(default_factory=dict)
    stats: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    folds: np.ndarray | None = field(default=None, repr=False, compare=False)
    fold_tokens: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.folds is None) != (self.fold_tokens is None):
            raise ValueError("folds and fold_tokens come together")
        if self.folds is not None:
            t, d = self.rows.shape
            if self.folds.ndim != 3 or self.folds.shape[::2] != (t, d):
                raise ValueError(f"folds must be (T={t}, m, d={d}), got {self.folds.shape}")
            if self.fold_tokens.shape != self.folds.shape[:2]:
                raise ValueError(
                    f"fold_tokens must be {self.folds.shape[:2]}, got {self.fold_tokens.shape}"
                )

    def row(self, name: str) -> np.ndarray:
        """The (d,) row of source ``name``."""
        return self.rows[self.names.index(name)]

    def select(self, names: Sequence[str]) -> GradientBank:
        """The bank restricted to ``names``, in that order (their fold rows too)."""
        idx = [self.names.index(n) for n in names]
        folds = None if self.folds is None else np.asarray(self.folds[idx])
        return GradientBank(
            tuple(names),
            self.rows[idx],
            self.info,
            {n: self.stats[n] for n in names},
            folds,
            None if self.fold_tokens is None else self.fold_tokens[idx],
        )

    def save(self, folder: str | Path) -> Path:
        """Write ``folds.safetensors`` (the fold rows; an earlier one is removed when this bank
        has none), ``bank.safetensors`` (the rows) and ``bank.json`` atomically into ``folder``,
        in that order: ``bank.json`` (whose ``info.stage_key`` marks a run's gradient stage
        done) comes last, so a kill or a full disk before it leaves a bank that is redone, never
        one that reads as done without its fold rows."""
        folder = Path(folder)
        rows = np.ascontiguousarray(self.rows)
        if self.folds is None:
            (folder / FOLDS_FILE).unlink(missing_ok=True)
        else:
            tensors = {
                "folds": torch.from_numpy(np.array(self.folds, dtype=np.float32)),
                "fold_tokens": torch.from_numpy(np.array(self.fold_tokens, dtype=np.int64)),
            }
            tag = {"names": json.dumps(list(self.names)), "rows_sha256": _rows_digest(rows)}
            atomic_write_bytes(folder / FOLDS_FILE, save_safetensors(tensors, metadata=tag))
        payload = save_safetensors({"rows": torch.from_numpy(rows)})
        atomic_write_bytes(folder / "bank.safetensors", payload)
        meta = {"names": list(self.names), "info": dict(self.info), "stats": dict(self.stats)}
        save_enveloped(folder / "bank.json", BANK_FORMAT, BANK_VERSION, meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, mmap: bool = False) -> GradientBank:
        """Read a saved bank; a cut, corrupt or inconsistent one raises a ValueError naming
        the file and how to rebuild it (the finished sources in ``parts/`` are reused); a
        ``bank.json`` of another format or a newer version is refused (`EnvelopeError`).

        ``mmap=True``: ``rows`` is a read-only memory map of ``bank.safetensors`` (`map_rows`),
        checked for non-finite values a block of rows at a time, so a bank larger than memory
        loads in constant memory (`merit_lab.analysis.conflict.compute_conflict_space` reads
        it in column blocks)."""
        folder = Path(folder)
        meta = load_enveloped(folder / "bank.json", BANK_FORMAT, BANK_VERSION, legacy=True)
        redo = (
            f"delete {folder}/bank.safetensors and bank.json and run the gradients stage "
            "again: the finished sources in parts/ are reused"
        )
        try:
            if mmap:
                rows = map_rows(folder)
            else:
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
        finite = np.zeros(rows.shape[0], dtype=bool)
        for lo, hi in _row_blocks(rows):
            finite[lo:hi] = np.isfinite(rows[lo:hi]).all(axis=1)
        bad = [n for n, ok in zip(meta["names"], finite, strict=True) if not ok]
        if bad:
            raise ValueError(
                f"{folder}/bank.safetensors: non-finite values in the rows of {bad}; {redo}"
            )
        folds = _map_folds(folder / FOLDS_FILE, meta["names"], rows)
        return cls(tuple(meta["names"]), rows, meta["info"], meta["stats"], *folds)


def _row_blocks(rows: np.ndarray) -> list[tuple[int, int]]:
    """(lo, hi) row ranges of at most `_CHECK_ROWS_BYTES` each (at least one row)."""
    t = rows.shape[0]
    step = max(1, _CHECK_ROWS_BYTES // max(1, rows[:1].nbytes))
    return [(lo, min(lo + step, t)) for lo in range(0, t, step)]


def _rows_digest(rows: np.ndarray) -> str:
    """sha256 of the float32 bytes of the rows, hashed a block of rows at a time."""
    h = hashlib.sha256()
    for lo, hi in _row_blocks(rows):
        h.update(np.ascontiguousarray(rows[lo:hi], dtype=np.float32).tobytes())
    return h.hexdigest()


def map_rows(folder: str | Path) -> np.memmap:
    """The (T, d) float32 rows of ``folder/bank.safetensors``, memory-mapped read-only.

    Nothing is read but the header: pages come in as they are used and, being file-backed, the
    kernel drops them under memory pressure. Raises ValueError when the file's ``rows`` is not
    a 2-D float32 tensor that the file holds entirely.
    """
    path = Path(folder) / "bank.safetensors"
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    spec = header.get("rows")
    if not isinstance(spec, dict) or spec.get("dtype") != "F32" or len(spec["shape"]) != 2:
        raise ValueError(f"{path}: 'rows' is not a 2-D float32 tensor ({spec})")
    lo, hi = spec["data_offsets"]
    shape = tuple(int(n) for n in spec["shape"])
    if hi - lo != 4 * math.prod(shape) or 8 + size + hi > path.stat().st_size:
        raise ValueError(f"{path}: cut short or inconsistent ({shape} rows, bytes {lo}-{hi})")
    return np.memmap(path, np.float32, "r", offset=8 + size + lo, shape=shape)


def _map_folds(
    path: Path, names: Sequence[str], rows: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(fold rows memory-mapped, fold tokens) of ``path`` when it belongs to these rows (the
    same names and the sha256 of the rows it was saved with), else (None, None): a bank saved
    without folds, or a kill between writing the two files, leaves no stale fold rows in use."""
    if not path.is_file():
        return None, None
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        tag = header.get("__metadata__") or {}
        if json.loads(tag["names"]) != list(names) or tag["rows_sha256"] != _rows_digest(rows):
            log.warning("%s: of another bank; ignored (run the gradients stage again)", path)
            return None, None
        spec, tok = header["folds"], header["fold_tokens"]
        if (spec["dtype"], tok["dtype"]) != ("F32", "I64"):
            raise ValueError(f"dtypes {spec['dtype']}, {tok['dtype']}")
        start = 8 + size
        folds = np.memmap(
            path,
            np.float32,
            "r",
            offset=start + spec["data_offsets"][0],
            shape=tuple(spec["shape"]),
        )
        tokens = np.fromfile(
            path, np.int64, count=math.prod(tok["shape"]), offset=start + tok["data_offsets"][0]
        ).reshape(tok["shape"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable (%s); no fold rows (run the gradients stage again)", path, e)
        return None, None
    return folds, tokens


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

    def read(
        self, name: str, folds: int = 1, batching: Mapping[str, Any] | None = None
    ) -> tuple[np.ndarray, dict] | None:
        """(row (d,), stats) of a finished source, or None when absent or stale; with
        ``folds`` > 1 also None when the part lacks that many fold rows, or dealt them under
        another micro-batching than ``batching`` (`batching.fold_batching`: it decides which
        examples each fold holds)."""
        found = self._read(name, folds, batching)
        return None if found is None else found[:2]

    def read_folds(
        self, name: str, folds: int, batching: Mapping[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """((m, d) fold rows, (m,) fold response tokens) of a finished source computed with
        ``folds`` = m folds under ``batching``, or None."""
        found = self._read(name, folds, batching) if folds > 1 else None
        return None if found is None else found[2]

    def _read(
        self, name: str, folds: int, batching: Mapping[str, Any] | None = None
    ) -> tuple[np.ndarray, dict, Any] | None:
        if not self.path(name).exists():
            return None
        try:
            with safe_open(self.path(name), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != self.key(name):
                    return None
                stats = json.loads(meta["stats"])
                if folds == 1:  # the row alone: its folds' stats are not this bank's
                    stats = {k: v for k, v in stats.items() if k not in FOLD_STATS}
                    return f.get_tensor("row").numpy(), stats, None
                if int(meta.get("folds", 1)) != folds:  # computed without (these) folds
                    return None
                if stats.get("fold_batching") != (dict(batching) if batching else None):
                    return None  # other examples in each fold
                fold = f.get_tensor("folds").numpy(), np.asarray(stats["fold_tokens"])
                return f.get_tensor("row").numpy(), stats, fold
        except Exception as e:  # a part cut short (a killed copy): it is a cache, so redo it
            log.warning("%s: unreadable (%s); computing source %r again", self.path(name), e, name)
            return None

    def write(
        self,
        name: str,
        row: np.ndarray,
        stats: Mapping[str, Any],
        folds: np.ndarray | None = None,
    ) -> None:
        """Write a finished source: its row, stats and (m, d) fold rows (their tokens are
        ``stats["fold_tokens"]``)."""
        meta = {"key": self.key(name), "source": name, "stats": json.dumps(stats)}
        tensors = {"row": torch.from_numpy(row)}
        if folds is not None:
            if len(stats.get("fold_tokens", ())) != folds.shape[0]:
                raise ValueError(f"source {name!r}: stats['fold_tokens'] must have one per fold")
            meta["folds"] = str(folds.shape[0])
            tensors["folds"] = torch.from_numpy(np.ascontiguousarray(folds, dtype=np.float32))
        atomic_write_bytes(self.path(name), save_safetensors(tensors, metadata=meta))


def read_part(
    out_dir: str | Path,
    name: str,
    info: Mapping[str, Any],
    source_keys: Mapping[str, str],
    folds: int = 1,
    batching: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, dict] | None:
    """(row, stats) of source ``name`` from ``out_dir/parts/`` when current for the bank
    ``info`` and the source's key (and, with ``folds`` > 1, holding that many fold rows dealt
    under ``batching``), else None."""
    parts = BankParts(Path(out_dir) / "parts", info["key"], source_keys)
    return parts.read(name, folds, batching)


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
