"""Mixture stage: load an instruction mixture of T sources, split each into train/calibration/eval.

Input: a folder of JSONL/parquet files (one per source, optionally in train/, calibration/, eval/
subfolders), one file with a source column, a `datasets` dataset (hub name or local path), or
"demo". Output: a `Mixture` of `Source`s holding normalised chat examples.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from merit_lab.data.checks import small_source_message, source_shortfall
from merit_lab.data.multimodal import content_problem, has_images, resolve_image_parts
from merit_lab.io import read_json

__all__ = [
    "Mixture",
    "MixtureError",
    "Source",
    "count_sources",
    "load_mixture",
    "normalize_example",
    "read_examples",
    "small_source_message",
    "source_shortfall",
]

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "calibration", "eval")
SOURCE_SUFFIXES = (".jsonl", ".parquet")
# Files that look like data but are not read: refused, so a source is never silently left out.
UNREAD_SUFFIXES = (".json", ".csv", ".tsv", ".gz", ".bz2", ".xz", ".zst", ".zip", ".arrow")
METADATA_FILE = "sources.json"
_FIX = "fill it in or remove the example"


class MixtureError(ValueError):
    """A mixture that cannot be loaded as given; the message names the file and line."""


@dataclass(frozen=True)
class Source:
    """One dataset of the mixture, split three ways.

    Attributes:
        name: unique source name (the file stem, or the value of the source column).
        train: examples the branches train on; each ``{"id": str, "messages": [...]}``.
        calibration: examples the gradient at θ0 is estimated from (≤ n used).
        eval: held-out examples for evaluation.
        metadata: free-form tags (family, planted labels, ...), from ``sources.json`` if present.
        origin: where the examples came from, for messages.
    """

    name: str
    train: tuple[dict, ...]
    calibration: tuple[dict, ...]
    eval: tuple[dict, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    origin: str = ""

    def split(self, name: str) -> tuple[dict, ...]:
        """The examples of split ``name`` (train, calibration or eval)."""
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)


@dataclass(frozen=True)
class Mixture:
    """An ordered collection of sources with unique names."""

    sources: tuple[Source, ...]
    origin: str = ""
    seed: int = 0
    info: Mapping[str, Any] = field(default_factory=dict)  # sources.json beyond "sources"

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for s in self.sources:
            if s.name in seen:
                raise MixtureError(
                    f"duplicate source name {s.name!r} in {self.origin or 'mixture'}"
                )
            seen.add(s.name)
        if not self.sources:
            raise MixtureError(f"{self.origin or 'mixture'}: no sources found")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def __iter__(self) -> Iterator[Source]:
        return iter(self.sources)

    def __getitem__(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"no source named {name!r}; have {list(self.names)[:8]}...")

    def select(self, names: Iterable[str]) -> Mixture:
        """A mixture of the named sources, in the given order."""
        return Mixture(tuple(self[n] for n in names), self.origin, self.seed, self.info)

    def metadata_table(self) -> list[dict[str, Any]]:
        """One dict per source: name, example counts per split and its metadata."""
        return [
            {
                "source": s.name,
                **{f"n_{sp}": len(s.split(sp)) for sp in SPLITS},
                **dict(s.metadata),
            }
            for s in self.sources
        ]


def normalize_example(raw: Any, where: str) -> dict:
    """Turn a raw record into ``{"id"?, "messages": [{"role", "content"}, ...]}``.

    Accepts a ``messages`` chat list, or ``prompt``/``response`` (optional ``system``).

    Raises:
        MixtureError: naming ``where`` (file and line) when a field is missing or malformed.
    """
    if not isinstance(raw, Mapping):
        raise MixtureError(f"{where}: expected an example (JSON object), got {type(raw).__name__}")
    if raw.get("messages") is not None:
        msgs = raw["messages"]
        if isinstance(msgs, np.ndarray):  # parquet gives arrays of structs
            msgs = msgs.tolist()
        if not isinstance(msgs, (list, tuple)) or not msgs:
            raise MixtureError(f"{where}: 'messages' must be a non-empty list; {_FIX}")
        messages = []
        for j, m in enumerate(msgs):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise MixtureError(f"{where}: messages[{j}] needs 'role' and 'content'")
            if m["role"] not in ROLES:
                raise MixtureError(
                    f"{where}: messages[{j}] has unknown role {m['role']!r}; roles must be "
                    "system, user or assistant (ShareGPT's human / gpt are user / assistant)"
                )
            if problem := content_problem(m["role"], m["content"]):
                raise MixtureError(f"{where}: messages[{j}].{problem}")
            _check_answer(m, f"{where}: messages[{j}]")
            content = m["content"]  # text, or a list of text / image parts (copied: paths change)
            content = content if isinstance(content, str) else [dict(c) for c in list(content)]
            messages.append({"role": str(m["role"]), "content": content})
    elif "prompt" in raw or "response" in raw:
        for key in ("prompt", "response"):
            if not isinstance(raw.get(key), str):
                raise MixtureError(f"{where}: missing or non-string field {key!r}")
        _check_answer({"role": "assistant", "content": raw["response"]}, f"{where}: 'response'")
        messages = [{"role": "user", "content": raw["prompt"]}]
        if isinstance(raw.get("system"), str) and raw["system"]:
            messages.insert(0, {"role": "system", "content": raw["system"]})
        messages.append({"role": "assistant", "content": raw["response"]})
    else:
        keys = sorted(raw)[:6]
        raise MixtureError(
            f"{where}: example has neither 'messages' nor 'prompt'/'response' (keys: {keys}); "
            'convert each record to {"messages": [{"role", "content"}, ...]} or '
            '{"prompt", "response"}'
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise MixtureError(f"{where}: no assistant message (no answer to train on); {_FIX}")
    out = {"messages": messages}
    if raw.get("id") is not None:
        out["id"] = str(raw["id"])
    return out


def _with_images(example: dict, root: Path, where: str) -> dict:
    """``example`` with its image paths resolved against ``root``; one error for a bad image."""
    if has_images(example) and (problem := resolve_image_parts(example, root)):
        raise MixtureError(f"{where}: {problem} (paths are relative to {root}); fix the path")
    return example


def _check_answer(message: Mapping, where: str) -> None:
    """An assistant turn must hold text: an empty answer trains on nothing but the end token."""
    if message["role"] == "assistant" and not message["content"].strip():
        raise MixtureError(f"{where}: empty assistant answer (nothing to train on); {_FIX}")


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of each non-blank line; the error names the file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise MixtureError(
                    f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column "
                    f"{e.start + 1}); save it as UTF-8, e.g. iconv -f latin1 -t utf-8"
                ) from e
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise MixtureError(
                    f"{path}:{lineno}: malformed JSON ({e.msg}); fix or remove line {lineno}"
                ) from e


def _parquet_records(path: Path) -> list[dict]:
    import pandas as pd

    try:
        return pd.read_parquet(path).to_dict("records")
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise MixtureError(
            f"{path}: not a readable parquet file ({type(e).__name__}: {e}); write it again "
            "(e.g. DataFrame.to_parquet) or remove it"
        ) from e


def read_examples(path: str | Path, root: str | Path | None = None) -> list[dict]:
    """Read and normalise every example of one JSONL or parquet file; image paths are made
    absolute (relative ones are relative to ``root``, the mixture folder; default the file's).

    Raises:
        MixtureError: a malformed line (file and line number), a bad record, a missing or
            unreadable image, or an empty file.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    out: list[dict] = []
    if path.suffix == ".jsonl":
        for lineno, raw in _jsonl_records(path):
            where = f"{path}:{lineno}"
            out.append(_with_images(normalize_example(raw, where), root, where))
    elif path.suffix == ".parquet":
        for i, raw in enumerate(_parquet_records(path)):
            where = f"{path} row {i}"
            out.append(_with_images(normalize_example(raw, where), root, where))
    else:
        raise MixtureError(f"{path}: unsupported file type (expected .jsonl or .parquet)")
    for i, ex in enumerate(out):
        ex.setdefault("id", f"{path.stem}-{i}")
    return out


def _source_files(folder: Path) -> dict[str, Path]:
    """Source name → file of a folder; a file that looks like data but would not be read, and
    two files of one source, are refused rather than silently left out."""
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.is_dir() or p.name == METADATA_FILE:
            continue
        if p.suffix not in SOURCE_SUFFIXES:
            _refuse_unread(p)
            continue
        if p.stem in files:
            raise MixtureError(
                f"duplicate source name {p.stem!r}: {files[p.stem]} and {p}; keep one of them "
                "(rename or move the other)"
            )
        files[p.stem] = p
    return files


def _refuse_unread(path: Path) -> None:
    """A source-like file merit-lab would skip: an upper-case suffix, JSON, CSV, compressed."""
    if path.suffix.lower() in SOURCE_SUFFIXES:
        raise MixtureError(
            f"{path}: not read (suffixes are lower-case); rename it to "
            f"{path.stem}{path.suffix.lower()}"
        )
    if path.suffix.lower() in UNREAD_SUFFIXES:
        raise MixtureError(
            f"{path}: not read: merit-lab reads .jsonl and .parquet source files; decompress "
            f"or convert it (one JSON object per line), or move it out of {path.parent}"
        )


def count_sources(spec: str | Path) -> int | None:
    """The number of sources of a local mixture folder, from its file names alone (None when
    that cheap count is not possible: a single table, a `datasets` dataset, a broken folder)."""
    path = Path(spec)
    if not path.is_dir() or _is_saved_dataset(path):
        return None
    try:
        return len(_source_files(path / "train" if (path / "train").is_dir() else path))
    except MixtureError:
        return None  # the mixture stage names the problem


def _rng(seed: int, name: str) -> np.random.Generator:
    # Per-source seeds from the name, so adding a source does not reshuffle the others.
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _split_examples(
    name: str,
    examples: Sequence[dict],
    *,
    calibration_n: int,
    eval_fraction: float,
    seed: int,
    has_eval: bool = False,
    eval_examples: Sequence[dict] = (),
    calibration_examples: Sequence[dict] | None = None,
) -> tuple[tuple[dict, ...], tuple[dict, ...], tuple[dict, ...]]:
    """Seeded split: eval is held out first, calibration is drawn from the remaining train part."""
    perm = _rng(seed, name).permutation(len(examples))
    if has_eval:
        evals, train = list(eval_examples), list(examples)
        held_out: set[int] = set()
    else:
        n_eval = round(eval_fraction * len(examples)) if len(examples) > 1 else 0
        held_out = {int(i) for i in perm[:n_eval]}
        evals = [examples[i] for i in perm[:n_eval]]
        train = [ex for i, ex in enumerate(examples) if i not in held_out]  # file order
    if calibration_examples is not None:
        calib = list(calibration_examples)
    else:
        calib = [examples[i] for i in perm if int(i) not in held_out][:calibration_n]
    return tuple(train), tuple(calib), tuple(evals)


def _read_metadata(folder: Path) -> tuple[dict[str, dict], dict[str, Any]]:
    """Per-source metadata and the rest of ``sources.json`` (e.g. the names of planted axes)."""
    path = folder / "sources.json"
    if not path.exists():
        return {}, {}
    try:
        meta = read_json(path)
    except ValueError as e:
        raise MixtureError(f"{e}; fix it, or remove it (it only adds metadata)") from e
    sources = meta.get("sources") if isinstance(meta, dict) else None
    if not isinstance(sources, dict):
        raise MixtureError(f"{path}: expected {{'sources': {{name: {{...}}}}, ...}}")
    info = {k: v for k, v in meta.items() if k != "sources"}
    return {str(k): dict(v) for k, v in sources.items()}, info


def _check_nonempty(name: str, train: Sequence, origin: str) -> None:
    if not train:
        raise MixtureError(
            f"source {name!r} ({origin}) is empty: it has no training examples; add examples "
            "or remove the file"
        )


def _load_folder(folder: Path, *, calibration_n: int, eval_fraction: float, seed: int) -> Mixture:
    meta, info = _read_metadata(folder)
    sources = []
    if (folder / "train").is_dir():
        train_files = _source_files(folder / "train")
        split_files = {
            sp: _source_files(folder / sp) if (folder / sp).is_dir() else {}
            for sp in ("calibration", "eval")
        }
        for sp, files in split_files.items():
            extra = sorted(set(files) - set(train_files))
            if extra:
                raise MixtureError(
                    f"{folder / sp}: sources {extra} have no file in {folder}/train; rename or "
                    "remove them"
                )
        for name, path in train_files.items():
            train = read_examples(path, folder)
            _check_nonempty(name, train, str(path))
            calib = (
                read_examples(split_files["calibration"][name], folder)
                if name in split_files["calibration"]
                else None
            )
            evals = (
                read_examples(split_files["eval"][name], folder)
                if name in split_files["eval"]
                else ()
            )
            tr, ca, ev = _split_examples(
                name,
                train,
                calibration_n=calibration_n,
                eval_fraction=eval_fraction,
                seed=seed,
                has_eval=name in split_files["eval"],
                eval_examples=evals,
                calibration_examples=calib,
            )
            sources.append(Source(name, tr, ca, ev, meta.get(name, {}), str(path)))
    else:
        files = _source_files(folder)
        if not files:
            raise MixtureError(
                f"{folder}: no .jsonl or .parquet source files found; put one <source>.jsonl "
                "per source there (or in train/, calibration/ and eval/ folders)"
            )
        for name, path in files.items():
            examples = read_examples(path)
            _check_nonempty(name, examples, str(path))
            tr, ca, ev = _split_examples(
                name, examples, calibration_n=calibration_n, eval_fraction=eval_fraction, seed=seed
            )
            sources.append(Source(name, tr, ca, ev, meta.get(name, {}), str(path)))
    return Mixture(tuple(sources), origin=str(folder), seed=seed, info=info)


def _group_records(
    records: Iterable[Mapping],
    *,
    source_column: str,
    where: str,
    calibration_n: int,
    eval_fraction: float,
    seed: int,
) -> Mixture:
    grouped: dict[str, list[dict]] = {}
    for i, raw in enumerate(records):
        loc = f"{where} row {i + 1}"
        if source_column not in raw or raw[source_column] in (None, ""):
            raise MixtureError(
                f"{loc}: missing source column {source_column!r}; set mixture.source_column to "
                f"the column that names each example's source (columns: {sorted(raw)[:8]})"
            )
        name = str(raw[source_column])
        ex = _with_images(normalize_example(raw, loc), Path(where).parent, loc)
        ex.setdefault("id", f"{name}-{len(grouped.get(name, []))}")
        grouped.setdefault(name, []).append(ex)
    if not grouped:
        raise MixtureError(f"{where}: no examples")
    sources = []
    for name in sorted(grouped):
        tr, ca, ev = _split_examples(
            name, grouped[name], calibration_n=calibration_n, eval_fraction=eval_fraction, seed=seed
        )
        _check_nonempty(name, tr, where)
        sources.append(Source(name, tr, ca, ev, {}, where))
    return Mixture(tuple(sources), origin=where, seed=seed)


def _is_saved_dataset(path: Path) -> bool:
    """A ``datasets.save_to_disk`` folder."""
    return (path / "dataset_info.json").exists() or (path / "state.json").exists()


def load_mixture(
    spec: str | Path,
    *,
    source_column: str = "source",
    calibration_n: int = 200,
    eval_fraction: float = 0.1,
    seed: int = 0,
    split: str = "train",
) -> Mixture:
    """Load a mixture from a folder, a single file with a source column, a dataset, or "demo".

    Args:
        spec: "demo"; a folder of ``<source>.jsonl|.parquet`` files (optionally inside ``train/``,
            ``calibration/``, ``eval/`` subfolders, with optional ``sources.json`` metadata); one
            ``.jsonl``/``.parquet`` file with a ``source_column``; a ``datasets.save_to_disk``
            folder; or a ``datasets`` hub name / loading script (network permitting).
        source_column: the column naming each example's source, for single-table inputs.
        calibration_n: calibration examples per source when they are drawn from train.
        eval_fraction: share of each source held out for evaluation when no eval split exists.
        seed: seed of the per-source splits (derived per source name, so stable under additions).
        split: which split of a ``datasets`` dataset to read.

    Returns:
        The mixture, sources in sorted-name (or file) order.
    """
    if str(spec) == "demo":
        from merit_lab.config.paths import DEMO_DIR

        spec = DEMO_DIR
    path = Path(spec)
    kwargs = dict(calibration_n=calibration_n, eval_fraction=eval_fraction, seed=seed)
    visible = [p for p in path.iterdir() if not p.name.startswith(".")] if path.is_dir() else []
    if (
        path.is_dir()
        and not _is_saved_dataset(path)
        and (
            any(p.suffix in SOURCE_SUFFIXES for p in visible)
            or (path / "train").is_dir()
            or not visible  # an empty folder: say so, rather than what `datasets` makes of it
        )
    ):
        return _load_folder(path, **kwargs)
    if path.is_file():
        if path.suffix == ".jsonl":
            records: Iterable[Mapping] = (raw for _, raw in _jsonl_records(path))
        elif path.suffix == ".parquet":
            records = _parquet_records(path)
        else:
            raise MixtureError(f"{path}: unsupported file type (expected .jsonl or .parquet)")
        return _group_records(records, source_column=source_column, where=str(path), **kwargs)
    return _load_datasets(str(spec), source_column=source_column, split=split, **kwargs)


def _load_datasets(spec: str, *, source_column: str, split: str, **kwargs: Any) -> Mixture:
    import datasets

    path = Path(spec)
    if path.is_dir() and _is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
    elif path.is_dir():
        ds = datasets.load_dataset(str(path), split=split)
    elif path.exists():
        raise MixtureError(f"{path}: not a folder or a .jsonl/.parquet file")
    else:
        try:
            ds = datasets.load_dataset(spec, split=split)
        except Exception as e:  # re-raised with the reason and the spec
            raise MixtureError(
                f"{spec!r} is not a local folder or file, and loading it as a `datasets` "
                f"dataset failed: {type(e).__name__}: {e}"
            ) from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise MixtureError(f"{spec}: no split {split!r} (have {list(ds)})")
        ds = ds[split]
    if source_column not in ds.column_names:
        raise MixtureError(
            f"{spec}: no source column {source_column!r} (columns: {ds.column_names})"
        )
    return _group_records(iter(ds), source_column=source_column, where=spec, **kwargs)
