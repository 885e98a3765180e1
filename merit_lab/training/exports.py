"""Exports of what the rows train, for other trainers: trl, open-instruct and a JSONL manifest.

Input: branch specs (`merit_lab.training.spec.BranchSpec`, label → spec: one per branch group of
a split and one per joint run), the mixture they name and its tokenizer. Output, under ``out/``::

    data/<source>.jsonl          the train examples of each source that the rows train (the
                                 down-weighted subset where a source has one; dropped sources
                                 are in no spec, so in no file)
    trl/<label>.yaml             a trl ``DatasetMixtureConfig`` (``datasets:`` over data/)
    open-instruct/<label>.yaml   an open-instruct ``dataset_mixer_list`` (+ ``dataset_mixer``)
    manifest.jsonl               one row per (branch, example): source, index, id, sha256, passes

The subset is the one training draws: the examples not excluded by a hand edit, of those the
ones the ``long_examples`` policy keeps, then `partition.session.fraction_subset` with the mixture
seed, so the manifest is seed-identical to what `merit_lab.training.trainer` trains. Merges are
exported as mergekit YAML by the merge stage (``merged/<row>/mergekit.yaml``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from merit_lab.data.formatting import tokenize_example
from merit_lab.data.mixture import Mixture, Source, load_mixture
from merit_lab.io import atomic_write_text
from merit_lab.partition.session import fraction_subset
from merit_lab.training.spec import BranchSpec

__all__ = [
    "EXPORT_FORMATS",
    "ManifestRow",
    "branch_manifest",
    "example_hash",
    "export_branches",
    "load_spec_mixture",
    "trained_indices",
]

EXPORT_FORMATS = ("trl", "open-instruct", "jsonl")


@dataclass(frozen=True)
class ManifestRow:
    """One example a branch trains.

    Attributes:
        branch: the spec's label (``merit-2d/0``, ``joint-1ep``).
        source: the source it comes from.
        index: its position in the source's train split (as `mixture.load_mixture` splits it).
        id: the example's own ``id``, else ``<source>:<index>``.
        sha256: `example_hash` of the example.
        passes: how many times the branch trains it (``epochs``, with a fractional last pass).
    """

    branch: str
    source: str
    index: int
    id: str
    sha256: str
    passes: int


def example_hash(example: Mapping[str, Any]) -> str:
    """sha256 of the example's canonical JSON (sorted keys, UTF-8, no spaces)."""
    text = json.dumps(example, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_spec_mixture(spec: BranchSpec) -> Mixture:
    """The mixture a spec trains from, loaded (and split) exactly as training loads it."""
    args = dict(spec.mixture)
    return load_mixture(args.pop("path"), **args)


def trained_indices(spec: BranchSpec, source: Source, tokenizer) -> np.ndarray:
    """Positions in ``source.train`` of the examples ``spec`` trains, in training's order.

    Training leaves out the example ids a hand edit excluded, tokenises the rest, leaves out
    what ``long_examples`` skips, then keeps ``fraction_subset(name, kept, f, mixture seed)``;
    this maps that subset back to positions in the split: (m,) int64.
    """
    gone = set(spec.excluded.get(source.name, ()))
    kept = np.asarray(
        [i for i, ex in enumerate(source.train) if ex.get("id") not in gone], dtype=np.int64
    )
    if spec.long_examples == "skip":
        fits = [
            tokenize_example(
                tokenizer, source.train[i], spec.train.max_length, spec.long_examples
            ).overflow
            != "skipped"
            for i in kept
        ]
        kept = kept[np.asarray(fits, dtype=bool)]
    f = spec.fractions.get(source.name, 1.0)
    if f < 1:
        kept = kept[fraction_subset(source.name, len(kept), f, spec.mixture.get("seed", 0))]
    return kept


def _passes(spec: BranchSpec, source: str, m: int) -> np.ndarray:
    """Times each of a source's m trained examples is seen: the whole epochs, plus one for those
    in the fractional last pass (the first round(frac·m) of a permutation seeded by the spec's
    seed and the source name, as `merit_lab.training.trainer` schedules it)."""
    whole, frac = int(spec.epochs), spec.epochs - int(spec.epochs)
    out = np.full(m, whole, dtype=np.int64)
    if frac > 1e-9:
        salt = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "little")
        perm = np.random.default_rng([spec.train.seed, salt]).permutation(m)
        out[perm[: round(frac * m)]] += 1
    return out


def branch_manifest(label: str, spec: BranchSpec, mixture: Mixture, tokenizer) -> list[ManifestRow]:
    """Every example ``spec`` trains, source by source (spec order), by position."""
    rows = []
    for name in spec.sources:
        source = mixture[name]
        idx = trained_indices(spec, source, tokenizer)
        for i, n in zip(idx, _passes(spec, name, len(idx)), strict=True):
            ex = source.train[int(i)]
            rows.append(
                ManifestRow(
                    label,
                    name,
                    int(i),
                    str(ex.get("id", f"{name}:{int(i)}")),
                    example_hash(ex),
                    int(n),
                )
            )
    return rows


def export_branches(
    specs: Mapping[str, BranchSpec],
    out: str | Path,
    formats: Sequence[str] = EXPORT_FORMATS,
    *,
    tokenizer=None,
) -> list[Path]:
    """Write the curated data and each spec's mixture in ``formats`` (see the module docstring).

    Args:
        specs: label → spec; every spec must name the same mixture (one run's specs do).
        out: the folder to write (created).
        formats: any of `EXPORT_FORMATS`; ``data/`` is written for "trl" and "open-instruct".
        tokenizer: the base model's tokenizer; needed only when a spec skips long examples
            (loaded from the first spec's ``base_model`` when None).

    Returns:
        The files written.

    Raises:
        ValueError: no specs, an unknown format, or specs over different mixtures or with
            different subsets of one source (then no single data file could serve both).
    """
    unknown = sorted(set(formats) - set(EXPORT_FORMATS))
    if unknown or not formats:
        raise ValueError(f"unknown formats {unknown}; expected some of {list(EXPORT_FORMATS)}")
    if not specs:
        raise ValueError("no branch specs to export (train or plan the run's experiments first)")
    first = next(iter(specs.values()))
    mixes = {json.dumps(dict(s.mixture), sort_keys=True) for s in specs.values()}
    if len(mixes) > 1:
        raise ValueError(f"the specs name different mixtures: {sorted(mixes)}")
    if tokenizer is None and any(s.long_examples == "skip" for s in specs.values()):
        from merit_lab.models.loading import load_tokenizer

        tokenizer = load_tokenizer(first.base_model, trust_remote_code=first.trust_remote_code)
    mixture = load_spec_mixture(first)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    subsets: dict[str, tuple[int, ...]] = {}
    for label, spec in specs.items():
        for name in spec.sources:
            idx = tuple(int(i) for i in trained_indices(spec, mixture[name], tokenizer))
            if subsets.setdefault(name, idx) != idx:
                raise ValueError(f"{label}: trains another subset of {name!r} than other specs")
    written: list[Path] = []
    data = {name: (out / "data" / f"{name}.jsonl").resolve() for name in subsets}
    if {"trl", "open-instruct"} & set(formats):
        for name, idx in subsets.items():
            lines = "".join(
                json.dumps(mixture[name].train[i], ensure_ascii=False) + "\n" for i in idx
            )
            written.append(atomic_write_text(data[name], lines))
    for label, spec in specs.items():
        stem = label.replace("/", "_")
        files = [str(data[n]) for n in spec.sources]
        head = f"# {label}: {len(files)} sources, {spec.epochs:g} epochs, seed {spec.train.seed}\n"
        if "trl" in formats:
            doc = {
                "datasets": [
                    {"path": "json", "data_files": f, "split": "train", "columns": ["messages"]}
                    for f in files
                ],
                "streaming": False,
            }
            written.append(atomic_write_text(out / "trl" / f"{stem}.yaml", head + _yaml(doc)))
        if "open-instruct" in formats:
            doc = {
                # "1.0": the whole file (open-instruct reads a value with "." as a fraction)
                "dataset_mixer_list": [v for f in files for v in (f, "1.0")],
                "dataset_mixer_list_splits": ["train"] * (2 * len(files)),
                "dataset_mixer": dict.fromkeys(files, 1.0),  # older scripts' dict form
            }
            path = out / "open-instruct" / f"{stem}.yaml"
            written.append(atomic_write_text(path, head + _yaml(doc)))
    if "jsonl" in formats:
        rows = [
            r
            for label, spec in specs.items()
            for r in branch_manifest(label, spec, mixture, tokenizer)
        ]
        text = "".join(json.dumps(r.__dict__) + "\n" for r in rows)
        written.append(atomic_write_text(out / "manifest.jsonl", text))
    return written


def _yaml(doc: Mapping) -> str:
    return yaml.safe_dump(dict(doc), sort_keys=False, allow_unicode=True, width=1000)
