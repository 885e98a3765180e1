"""On-demand analysis of a run's calibration examples: the examples inside the conflict space and
the bootstrap stability of the split (``merit-lab examples runs/<name>``).

Input: a run with its gradient bank, conflict space and partition. Output: ``examples.safetensors``
(`merit_lab.analysis.examples.ExampleSketches`), ``examples.parquet`` (one row per example:
coordinates,
own cosine, outlier flag, text) and ``stability.json``
(`merit_lab.partition.stability.SplitStability`).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from merit_lab.analysis.examples import ExampleSketches, dots_to_rows, resketch
from merit_lab.io import atomic_write_bytes, atomic_write_json
from merit_lab.partition.methods import split_balanced
from merit_lab.partition.plan import Partition
from merit_lab.partition.stability import SplitStability, bootstrap_split_stability, recommend_n
from merit_lab.pipeline.rundir import RunDir, load_run_mixture, writes_run

__all__ = [
    "compute_example_sketches",
    "compute_split_stability",
    "example_text",
    "load_example_session",
    "load_example_sketches",
    "load_example_table",
    "load_stability",
    "stability_section",
    "train_example_ids",
]

log = logging.getLogger(__name__)

DEFAULT_DIM = 8192  # re-sketch width of the stored rows: cosine error ~1/√8192 ≈ 0.011
_TEXT_CHARS = 240


def example_text(example: dict, chars: int = _TEXT_CHARS) -> str:
    """The first user turn and the first answer, shortened: a hover label."""
    msgs = example.get("messages", [])
    user = next((m["content"] for m in msgs if m["role"] == "user"), "")
    answer = next((m["content"] for m in msgs if m["role"] == "assistant"), "")
    text = f"{user} → {answer}".replace("\n", " ")
    return text if len(text) <= chars else text[: chars - 1] + "…"


@writes_run
def compute_example_sketches(
    run_dir: str | Path,
    *,
    dim: int = DEFAULT_DIM,
    sources: Sequence[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> ExampleSketches:
    """One sketched gradient per calibration example of every source (batches of one), kept as
    inner products with the bank rows and a ``dim``-wide re-sketch; written to
    ``examples.safetensors`` and ``examples.parquet`` (atomically, as the run's one writer).

    Skipped when the stored file was made from the current bank at this ``dim`` (unless
    ``force``). Costs one forward + backward per calibration example: T·n of them.
    """
    from merit_lab.analysis.convergence import sketch_example_gradients
    from merit_lab.data.formatting import kept_examples
    from merit_lab.models.loading import load_model, load_tokenizer, resolve_model_path

    run = RunDir(Path(run_dir))
    cfg = run.load_config()
    bank = run.load_bank()
    bank_key = bank.info.get("stage_key") or bank.info.get("key")
    names = list(sources) if sources is not None else list(bank.names)
    if run.example_sketches.is_file() and not force:
        old = ExampleSketches.load(run.example_sketches)
        if (old.info.get("bank_key"), old.info.get("dim"), sorted(set(old.sources))) == (
            bank_key,
            dim,
            sorted(names),
        ):
            log.info("examples: up to date")
            return old
    calib_ids = {s["name"]: s["calibration_ids"] for s in run.read_mixture()["sources"]}
    mixture = load_run_mixture(cfg)
    model_path = resolve_model_path(cfg.model)
    tok = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    model = load_model(
        model_path, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code
    )
    cal, policy = cfg.calibration, cfg.mixture.long_examples
    parts: dict[str, list] = {
        k: [] for k in ("sources", "ids", "texts", "tokens", "dots", "norms", "rows")
    }
    t0 = time.perf_counter()
    for name in names:
        examples = kept_examples(
            tok, mixture[name].calibration, cal.max_length, policy, limit=cal.n
        )
        ids = [str(ex.get("id", "")) for ex in examples]
        if ids != list(calib_ids.get(name, ids)):
            raise ValueError(
                f"{run.mixture}: the calibration examples of {name!r} changed since the mixture "
                "stage; run `merit-lab run` (mixture and gradients) first"
            )
        rows, tokens = sketch_example_gradients(
            model,
            tok,
            examples,
            sketch=cfg.sketch,
            max_length=cal.max_length,
            include=cfg.parameters.include,
            exclude=cfg.parameters.exclude,
            preset=cfg.parameters.preset,
            long_examples=policy,
            progress=progress,
        )
        dots, norms = dots_to_rows(rows, bank.rows)
        parts["sources"] += [name] * len(examples)
        parts["ids"] += ids
        parts["texts"] += [example_text(ex) for ex in examples]
        parts["tokens"].append(tokens)
        parts["dots"].append(dots)
        parts["norms"].append(norms)
        parts["rows"].append(resketch(rows, dim, seed=cfg.sketch.seed))
    seconds = time.perf_counter() - t0
    sk = ExampleSketches(
        sources=parts["sources"],
        ids=parts["ids"],
        texts=parts["texts"],
        tokens=np.concatenate(parts["tokens"]),
        dots=np.vstack(parts["dots"]),
        norms=np.concatenate(parts["norms"]),
        bank_names=bank.names,
        bank_norms=np.linalg.norm(bank.rows.astype(np.float64), axis=1),
        rows=np.vstack(parts["rows"]),
        info={
            "bank_key": bank_key,
            "dim": dim,
            "resketch_seed": cfg.sketch.seed,
            "sketch": cfg.sketch.to_dict(),
            "seconds": seconds,
            "examples": len(parts["ids"]),
        },
    )
    sk.save(run.example_sketches)
    _save_table(run, sk)
    log.info("examples: %d examples in %.1f s", sk.n_examples, seconds)
    return sk


def _save_table(run: RunDir, sk: ExampleSketches) -> Path:
    space = run.load_space()
    table = sk.table(space, r=min(3, space.n_sources))
    buf = io.BytesIO()
    table.to_parquet(buf)
    return atomic_write_bytes(run.example_table, buf.getvalue())


def load_example_sketches(run_dir: str | Path) -> ExampleSketches:
    """The run's ``examples.safetensors`` (FileNotFoundError naming the command that makes it)."""
    run = RunDir(Path(run_dir))
    if not run.example_sketches.is_file():
        raise FileNotFoundError(
            f"{run.example_sketches} is missing: run `merit-lab examples {run.root}`"
        )
    return ExampleSketches.load(run.example_sketches)


def load_example_table(run_dir: str | Path) -> pd.DataFrame:
    """The run's ``examples.parquet``: one row per calibration example."""
    run = RunDir(Path(run_dir))
    if not run.example_table.is_file():
        raise FileNotFoundError(f"{run.example_table} is missing: run `merit-lab examples`")
    return pd.read_parquet(run.example_table)


def _references(run: RunDir, names: Sequence[str], part: Partition, rs: Sequence[int]) -> dict:
    """r → the split the run reports: the balanced split of the bank's conflict space (of the
    partition's sources, with its counts)."""
    space = run.load_space().select(list(names))
    return {r: split_balanced(space, dict(part.examples), dict(part.tokens), r=r) for r in rs}


@writes_run
def compute_split_stability(
    run_dir: str | Path,
    *,
    rs: Sequence[int] = (1, 2),
    n_boot: int = 200,
    seed: int = 0,
    threshold: float | None = None,
) -> SplitStability:
    """Bootstrap the run's conflict matrix and split over its calibration examples (needs
    `compute_example_sketches`); writes ``stability.json`` with the recommended n.

    The sources are the partition's (dropped ones left out), balanced by its counts; the
    reference split for each r is the balanced split of the bank's own conflict space (for the
    partition's r this is partition.json's grouping unless it was edited by hand).
    """
    run = RunDir(Path(run_dir))
    sk = load_example_sketches(run.root)
    part = run.load_partition()
    names = [s for s in run.load_space().names if s in part.sources]
    rs = [r for r in rs if 2**r <= len(names)]
    refs = _references(run, names, part, rs)
    t0 = time.perf_counter()
    stab = bootstrap_split_stability(
        sk.rows,
        sk.tokens,
        sk.sources,
        names,
        examples=dict(part.examples),
        train_tokens=dict(part.tokens),
        rs=rs,
        references=refs,
        n_boot=n_boot,
        seed=seed,
    )
    rec_kwargs = {} if threshold is None else {"threshold": threshold}
    keep = np.isin(np.asarray(sk.sources, dtype=object), names)
    rec = recommend_n(
        sk.rows[keep], sk.tokens[keep], [s for s in sk.sources if s in names], **rec_kwargs
    )
    reported_r = part.params.get("r")
    info = {
        **stab.info,
        "bank_key": sk.info.get("bank_key"),
        "seconds": time.perf_counter() - t0,
        "recommended_n": rec,
        "calibration_n": run.load_config().calibration.n,
        "partition_r": reported_r,
        "partition_is_reference": bool(
            reported_r in refs and refs[reported_r].groups == part.groups
        ),
        # how far the re-sketched rows' all-example cosines are from the bank's
        "resketch_max_abs_error": float(
            np.abs(stab.cosine - run.load_space().select(names).cosine).max()
        ),
    }
    stab = SplitStability(**{**stab.__dict__, "info": info})
    atomic_write_json(run.stability, stab.to_dict())
    return stab


def train_example_ids(run_dir: str | Path) -> dict[str, list[str]]:
    """Per source, the id of each train example a row may train, in ``mixture.json``'s
    ``train_example_tokens`` order (the ``long_examples`` policy applied as the branches do)."""
    from merit_lab.data.formatting import kept_examples
    from merit_lab.models.loading import load_tokenizer, resolve_model_path

    run = RunDir(Path(run_dir))
    cfg = run.load_config()
    mixture = load_run_mixture(cfg)
    policy = cfg.mixture.long_examples
    tok = None
    if policy == "skip":
        tok = load_tokenizer(resolve_model_path(cfg.model), trust_remote_code=cfg.trust_remote_code)
    counts = run.example_tokens()
    out = {}
    for s in mixture:
        train = kept_examples(tok, s.train, cfg.train.max_length, policy) if tok else s.train
        out[s.name] = [str(ex.get("id", "")) for ex in train]
        if s.name in counts and len(out[s.name]) != len(counts[s.name]):
            raise ValueError(
                f"{run.mixture}: {s.name!r} has {len(counts[s.name])} train examples there but "
                f"{len(out[s.name])} now; run the mixture stage again"
            )
    return out


def load_example_session(run_dir: str | Path):
    """`merit_lab.pipeline.analysis.load_edit_session` with each source's train example ids, so
    the session can drop examples (`EditSession.drop_examples`) as well as sources."""
    from merit_lab.pipeline.analysis import load_edit_session

    session = load_edit_session(run_dir)
    session.train_ids = train_example_ids(run_dir)
    return session


def load_stability(run_dir: str | Path) -> SplitStability | None:
    """The run's ``stability.json``, or None when `compute_split_stability` has not run."""
    run = RunDir(Path(run_dir))
    if not run.stability.is_file():
        return None
    return SplitStability.load(run.stability)


def stability_section(run_dir: str | Path, figure=None) -> list[str]:
    """The report's "Split stability" section (nothing before ``merit-lab examples``);
    ``figure(fig, stem)`` saves a figure and returns its link."""
    stab = load_stability(run_dir)
    if stab is None:
        return []
    from merit_lab.partition.stability import describe_stability
    from merit_lab.pipeline.markdown import markdown_table

    run = RunDir(Path(run_dir))
    r = run.load_partition().params.get("r") if run.partition.is_file() else None
    lines = ["## Split stability", ""]
    lines += [
        f"{x}  " if not x.startswith("WARNING") else f"**{x}**  "
        for x in describe_stability(stab, r if r in stab.ari else None)
    ]
    summary = stab.summary().drop(columns=["unstable"])
    lines += ["", markdown_table(summary, fmt="{:.3g}"), ""]
    pairs = stab.pair_table()
    widest = pairs.assign(width=pairs["q95"] - pairs["q05"]).nlargest(5, "width")
    lines += [
        "Widest 90% intervals of a cosine:",
        "",
        markdown_table(widest.set_index(["a", "b"]), fmt="{:+.3f}"),
        "",
    ]
    if figure is not None:
        from merit_lab.viz.plots_stability import plot_ari_distribution, plot_coassignment

        lines += [figure(plot_ari_distribution(stab), "stability_ari"), ""]
        lines += [
            figure(plot_coassignment(stab, rr), f"stability_coassign_r{rr}") for rr in stab.rs
        ] + [""]
    return lines
