"""A mixture's sizes for `merit-lab plan`: examples and tokens per source and split.

Input: a run's ``mixture.json`` (the mixture stage's counts), a local mixture tokenised now, or
the config's stated ``plan:`` size (a mixture not fetched yet). Output: `MixtureSizes`, with
the basis it came from said in words.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merit_lab.config.schema import RunConfig
from merit_lab.io import read_json

__all__ = [
    "MixtureSizes",
    "SourceSize",
    "count_mixture_sizes",
    "find_mixture_sizes",
    "sizes_from_record",
    "stated_sizes",
]


@dataclass(frozen=True)
class SourceSize:
    """One source's sizes, in examples and tokens at the lengths its consumers use."""

    name: str
    n_train: int
    n_calibration: int
    n_eval: int
    train_tokens: int  # prompt + response tokens of its train split, at train.max_length
    train_response_tokens: int  # the run's size unit (`SIZE_UNIT`)
    calibration_tokens: int  # its calibration examples, at calibration.max_length
    image_tokens: int = 0  # of train_tokens: image tokens (0 when not known)


@dataclass(frozen=True)
class MixtureSizes:
    sources: tuple[SourceSize, ...]
    basis: str  # where the sizes come from, said in the table
    longest: int = 0  # tokens of the longest train example (0: not known)

    def total(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.sources)

    def image_tokens_per_example(self) -> float:
        return self.total("image_tokens") / max(self.total("n_train"), 1)

    def mean_tokens(self) -> float:
        """Tokens per train example over the mixture."""
        return self.total("train_tokens") / max(self.total("n_train"), 1)


def sizes_from_record(record: Mapping[str, Any], cfg: RunConfig, basis: str) -> MixtureSizes:
    """Sizes from a run's ``mixture.json`` (the mixture stage's own counts). Calibration tokens:
    the first n examples' lengths are not stored, so n x the mean train example length, each
    capped at calibration.max_length."""
    out, longest = [], 0
    for s in record["sources"]:
        longest = max(longest, *s.get("train_example_tokens", [0]))
        lengths = s.get("train_example_tokens") or [s["train_tokens"] / max(s["n_train"], 1)]
        per = sum(min(n, cfg.calibration.max_length) for n in lengths) / len(lengths)
        n_cal = min(s["n_calibration"], cfg.calibration.n)
        out.append(
            SourceSize(
                s["name"],
                s["n_train"],
                n_cal,
                s["n_eval"],
                s["train_tokens"],
                s.get("train_response_tokens", s["train_tokens"]),
                round(per * n_cal),
            )
        )
    return MixtureSizes(tuple(out), basis, longest)


def stated_sizes(cfg: RunConfig) -> MixtureSizes:
    """Sizes from the config's ``plan:`` section (a mixture not here yet): every source alike,
    examples split as the mixture loader would (``round(eval_fraction x E)`` held out, n
    calibration examples drawn from train), each example capped at its max_length."""
    p = cfg.plan
    if p.sources is None:
        raise ValueError("plan: give sources, examples_per_source and tokens_per_example")
    n_eval = round(cfg.mixture.eval_fraction * p.examples_per_source)
    n_train = p.examples_per_source - n_eval
    n_cal = min(cfg.calibration.n, n_train)
    train_len = min(p.tokens_per_example, cfg.train.max_length)
    src = SourceSize(
        "",
        n_train,
        n_cal,
        n_eval,
        n_train * train_len,
        n_train * min(p.response_tokens_per_example, train_len),
        n_cal * min(p.tokens_per_example, cfg.calibration.max_length),
        n_train * p.image_tokens_per_example,
    )
    sources = tuple(SourceSize(**{**src.__dict__, "name": f"source-{i}"}) for i in range(p.sources))
    basis = (
        f"stated in the config (plan:): {p.sources} sources x {p.examples_per_source} examples "
        f"of {p.tokens_per_example} tokens ({p.response_tokens_per_example} response, "
        f"{p.image_tokens_per_example} image): an estimate, not counted"
    )
    return MixtureSizes(sources, basis, p.tokens_per_example)


def count_mixture_sizes(cfg: RunConfig, tokenizer) -> MixtureSizes:
    """Sizes of a local mixture, tokenised now as the mixture stage does (split as the run
    splits it; train and eval at train.max_length, calibration at calibration.max_length)."""
    from merit_lab.data.formatting import tokenize_example
    from merit_lab.data.mixture import load_mixture

    m = cfg.mixture
    mixture = load_mixture(
        m.path,
        source_column=m.source_column,
        calibration_n=cfg.calibration.n,
        eval_fraction=m.eval_fraction,
        seed=cfg.seed,
        split=m.split,
    )
    out, longest = [], 0
    for s in mixture:
        train = [
            tokenize_example(tokenizer, ex, cfg.train.max_length, m.long_examples) for ex in s.train
        ]
        train = [t for t in train if t.overflow != "skipped"]
        longest = max(longest, *(t.n_tokens for t in train), 0)
        cal = [
            tokenize_example(tokenizer, ex, cfg.calibration.max_length, m.long_examples)
            for ex in s.calibration[: cfg.calibration.n]
        ]
        out.append(
            SourceSize(
                s.name,
                len(train),
                len(cal),
                len(s.eval),
                sum(t.n_tokens for t in train),
                sum(t.n_response_tokens for t in train),
                sum(t.n_tokens for t in cal),
                sum(sum(t.mm_token_type_ids or ()) for t in train),
            )
        )
    return MixtureSizes(tuple(out), f"counted now: {m.path} with the model's tokenizer", longest)


def find_mixture_sizes(cfg: RunConfig, record: str | Path | None = None) -> MixtureSizes:
    """The mixture's sizes from the best source there is: a run's ``mixture.json`` (``record``,
    when it exists), the local mixture tokenised now (its model's tokenizer must be local),
    then the config's stated ``plan:`` size.

    Raises:
        ValueError: none of the three is there; the message says what to add.
    """
    from merit_lab.models.fetch import FETCHABLE_MODELS
    from merit_lab.models.loading import load_tokenizer, resolve_model_path

    if record is not None and Path(record).is_file():
        return sizes_from_record(read_json(record), cfg, f"measured: {record}")
    local_model = cfg.model in ("demo", *FETCHABLE_MODELS) or Path(cfg.model).expanduser().exists()
    local_mixture = cfg.mixture.path == "demo" or Path(cfg.mixture.path).exists()
    if local_mixture and local_model:
        tok = load_tokenizer(resolve_model_path(cfg.model), trust_remote_code=cfg.trust_remote_code)
        return count_mixture_sizes(cfg, tok)
    if cfg.plan.sources is not None:
        return stated_sizes(cfg)
    why = (
        "is not here" if not local_mixture else "cannot be tokenised here (the model is not local)"
    )
    raise ValueError(
        f"mixture {cfg.mixture.path!r} {why}, and the config states no size: add a plan: "
        "section (sources, examples_per_source, tokens_per_example, "
        "response_tokens_per_example) or fetch the data and the model first"
    )
