"""θ0 of the short-answer collapse demo, and the two gates it passes before anything is fine-tuned.

`instruct_collapse_base` instruction-tunes the demo base (``data/demo/base``) on θ0's four
conversational families and four of the 24 short sources (`collapse.THETA0_SHORT`), on words
outside the fresh pool, until its conversational loss plateaus (``pretrain.json`` records the
probe curve). `check_collapse_gates` measures the stated gates and writes ``<θ0>/gates.json``:

(a) θ0 answers at least `STYLE_GATE` of the held-out conversations (``heldout/conv-*``) in style,
    counted in tokens (`evaluate.style_scores`); paraphrased asks (generated here, fresh words)
    are measured the same way and recorded (``used``: whether they would pass);
(b) no loss barrier (above `BARRIER_TOLERANCE` of the endpoint loss) between two seeds'
    fine-tunes of one source group at the frozen budget `COLLAPSE_BUDGET`
    (`interpolation_curve` on the group's held-out loss): merge-readiness, the paper's (a).
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from merit_lab.demo.collapse import (
    CONVERSATIONS,
    HELDOUT_DIR,
    THETA0_SHORT,
    collapse_sources,
    sample_conversation,
    sample_short,
)
from merit_lab.io import atomic_dir, atomic_write_json, read_json

__all__ = [
    "BARRIER_TOLERANCE",
    "COLLAPSE_BUDGET",
    "STYLE_GATE",
    "check_collapse_gates",
    "instruct_collapse_base",
    "theta0_batches",
]

STYLE_GATE = 0.95  # gate (a): θ0's least in-style share on the held-out conversations
# The fine-tuning budget the joint-only pilot froze before any split trained (batch 16; one epoch
# is 96 steps): the smallest peak learning rate at which joint-1ep collapses the held-out
# conversations as the paper reports, to shorter answers (at most 50% in style over 3 seeds,
# under 5% cut off at the generation limit), while the short-task loss still falls from 0.5 to 1
# to 2 epochs, and gate (b) holds. Tried: 1e-4 (66% in style), 3e-4 (34-53%, but 12-28% of the
# answers never ended: a lost end-of-turn, not the collapse), 1e-3 (0%, but a barrier of 2.4% of
# the loss between two seeds' fine-tunes), 3e-3, then 5e-4. The pilot's numbers are in
# configs/demo-collapse.yaml, whose train section uses this budget (tests/test_collapse_demo.py
# holds the two and gates.json together).
COLLAPSE_BUDGET: dict = {"lr": 5e-4, "batch_size": 16, "warmup_ratio": 0.05, "epochs": 1.0}
# gate (b): a barrier counts above this share of the path's higher endpoint loss, as linear mode
# connectivity is usually judged (Frankle et al. 2020 allow 2% of the error). The run report's
# rule (`BARRIER_NOISE`) is float rounding, 1e-6: gates.json says whether that one passes too.
BARRIER_TOLERANCE = 0.01
_ROUNDING = 1e-6


def theta0_batches(seed: int, batch_size: int) -> Iterator[list[tuple[str, str]]]:
    """θ0's training draw, one batch of (prompt, response) pairs per step, without end.

    Each batch is of one kind, conversational or short, each with probability 1/2 (one kind per
    batch: the short examples are not padded to the conversational length); within it a
    conversational family (θ0's templates) or one of `THETA0_SHORT` is drawn per example. Words
    never come from the fresh pool.
    """
    rng = random.Random(f"merit-lab-collapse-theta0:{seed}")
    families = list(CONVERSATIONS)
    while True:
        if rng.random() < 0.5:
            yield [sample_conversation(rng.choice(families), rng) for _ in range(batch_size)]
        else:
            yield [sample_short(rng.choice(THETA0_SHORT), rng) for _ in range(batch_size)]


def _chat(pairs: Sequence[tuple[str, str]]) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
        for p, r in pairs
    ]


def instruct_collapse_base(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 50,
    probe_every: int = 100,
    overwrite: bool = True,
) -> Path:
    """θ0: ``base_dir`` (the demo base) instruction-tuned on `theta0_batches`, saved atomically.

    Every ``probe_every`` steps the loss of a fixed probe (64 conversational and 32 short
    examples of θ0's own distribution, drawn apart from the training draw; no held-out example)
    is recorded, so ``pretrain.json`` shows the plateau: ``probe`` (step, conversational loss,
    short loss) and ``plateau`` (each probe loss's relative change over the last quarter of the
    steps). Only response tokens are trained; AdamW with warmup and cosine decay
    (`base.train_from_batches`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merit_lab.data.formatting import collate, tokenize_example
    from merit_lab.demo.base import train_from_batches
    from merit_lab.evaluation.evaluate import heldout_loss

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    probe_rng = random.Random(f"merit-lab-collapse-probe:{seed}")
    probe = {
        "conversation": _chat(
            [sample_conversation(f, probe_rng) for f in CONVERSATIONS for _ in range(16)]
        ),
        "short": _chat([sample_short(s, probe_rng) for s in THETA0_SHORT for _ in range(8)]),
    }
    curve: list[dict] = []
    batches = theta0_batches(seed, batch_size)
    step = 0

    def record() -> None:
        model.eval()
        losses = {k: heldout_loss(model, tokenizer, v) for k, v in probe.items()}
        model.train()
        curve.append({"step": step, **{k: round(v, 4) for k, v in losses.items()}})

    def next_batch() -> dict[str, torch.Tensor]:
        nonlocal step
        if step % probe_every == 0:  # before the step's update: step 0 is the demo base
            record()
        step += 1
        batch = [tokenize_example(tokenizer, ex) for ex in _chat(next(batches))]
        return collate(batch, tokenizer.pad_token_id)

    ema, seconds = train_from_batches(
        model, next_batch, steps=steps, lr=lr, warmup=warmup, desc="instruction-tune θ0"
    )
    record()
    last = [c for c in curve if c["step"] >= 0.75 * steps]
    info = {
        "from": str(base_dir),
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "conversations": list(CONVERSATIONS),
        "short_sources": list(THETA0_SHORT),
        "final_loss_ema": round(ema, 4),
        "probe": curve,
        "plateau": {
            k: round(abs(last[0][k] - last[-1][k]) / last[0][k], 4)
            for k in ("conversation", "short")
        },
        "wall_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "pretrain.json", info)
    return Path(out_dir)


def _paraphrases(seed: int, n: int):
    """The paraphrased asks on fresh words, ``n`` per family, as an in-memory evaluation mixture."""
    from merit_lab.data.mixture import Mixture, Source

    sources = []
    for family in CONVERSATIONS:
        rng = random.Random(f"merit-lab-collapse-paraphrase:{seed}:{family}")
        pairs = [sample_conversation(family, rng, fresh=True, paraphrase=True) for _ in range(n)]
        meta = {"family": "paraphrase", "conversation": family}
        sources.append(Source(f"para-{family}", (), (), tuple(_chat(pairs)), meta, "generated"))
    return Mixture(tuple(sources), origin="paraphrases")


def _style_gate(base: Path, mixture_dir: Path, max_new_tokens: int, n_paraphrases: int) -> dict:
    """Gate (a), θ0 on the paraphrases, and θ0's answers on the short sources."""
    from merit_lab.data.mixture import load_mixture
    from merit_lab.evaluation.evaluate import evaluate_model
    from merit_lab.evaluation.heldout import load_heldout
    from merit_lab.models.loading import load_model, load_tokenizer

    tok, model = load_tokenizer(base), load_model(base, device="cpu")
    kw = {"label": "theta0", "max_new_tokens": max_new_tokens, "progress": False}
    held = evaluate_model(model, tok, load_heldout(mixture_dir / HELDOUT_DIR), **kw)
    para = evaluate_model(model, tok, _paraphrases(0, n_paraphrases), **kw)
    short = evaluate_model(model, tok, load_mixture(mixture_dir), **kw)

    def mean(table, metric: str, known: bool | None = None) -> float:
        sub = table[table.metric == metric]
        if known is not None:
            sub = sub[sub.source.isin(THETA0_SHORT) == known]
        return round(float(sub["value"].mean()), 4)

    def per_source(table, metric: str) -> dict:
        return table[table.metric == metric].set_index("source")["value"].round(4).to_dict()

    metrics = ("in_style_tokens", "no_eos", "length_ratio_median", "loss")
    conv = mean(held, "in_style_tokens")
    return {
        "threshold": STYLE_GATE,
        "conversation": conv,
        "passed": conv >= STYLE_GATE,
        "heldout": {m: mean(held, m) for m in metrics},
        "per_source": per_source(held, "in_style_tokens"),
        "paraphrases": {
            "in_style_tokens": mean(para, "in_style_tokens"),
            "per_source": per_source(para, "in_style_tokens"),
            "loss": mean(para, "loss"),
            "used": mean(para, "in_style_tokens") >= STYLE_GATE,
        },
        "short_sources": {
            group: {m: mean(short, m, known) for m in ("in_style_tokens", "exact_match", "loss")}
            for group, known in (("known", True), ("new", False))
        },
        "max_new_tokens": max_new_tokens,
    }


def _barrier_gate(
    base: Path,
    mixture_dir: Path,
    work_dir: Path,
    *,
    group: Sequence[str],
    seeds: Sequence[int],
    train: dict,
    alphas: int,
) -> dict:
    """Gate (b): two seeds' fine-tunes of ``group``, and the loss along the line between them."""
    from merit_lab.config.schema import TrainConfig
    from merit_lab.data.mixture import load_mixture
    from merit_lab.diagnostics.measures import interpolation_curve, make_loss_fn
    from merit_lab.models.loading import load_model, load_tokenizer
    from merit_lab.training import BranchSpec, train_branch

    finals = []
    for seed in seeds:
        spec = BranchSpec(
            name=f"gate-s{seed}",
            base_model=str(base),
            output_dir=str(work_dir / f"s{seed}"),
            sources=tuple(group),
            mixture={"path": str(mixture_dir)},
            epochs=float(train.get("epochs", 1.0)),
            train=TrainConfig(**{k: v for k, v in train.items() if k != "epochs"}, seed=seed),
            device="cpu",
        )
        finals.append(train_branch(spec))
    tok, model = load_tokenizer(base), load_model(base, device="cpu")
    mix = load_mixture(mixture_dir)
    examples = [ex for name in group for ex in mix[name].split("eval")]
    curve = interpolation_curve(
        model,
        finals[0],
        finals[1],
        make_loss_fn(tok, examples),
        np.linspace(0.0, 1.0, alphas),
        progress=False,
    )
    top = max(abs(curve["loss_a"]), abs(curve["loss_b"]))
    relative = curve["barrier"] / top if top > 0 else curve["barrier"]
    return {
        "group": list(group),
        "seeds": list(seeds),
        "train": train,
        "alphas": [round(float(a), 4) for a in curve["alphas"]],
        "losses": [round(float(x), 5) for x in curve["losses"]],
        "excess": [float(f"{x:.3g}") for x in curve["excess"]],
        "barrier": float(curve["barrier"]),
        "relative_barrier": float(relative),
        "tolerance": BARRIER_TOLERANCE,
        "passed": relative <= BARRIER_TOLERANCE,
        "below_rounding": relative <= _ROUNDING,
    }


def check_collapse_gates(
    mixture_dir: Path,
    base_dir: Path | None = None,
    *,
    work_dir: Path,
    train: dict,
    conventions: Sequence[str] = ("bare", "upper"),
    seeds: Sequence[int] = (0, 1),
    max_new_tokens: int = 272,
    alphas: int = 7,
    n_paraphrases: int = 32,
) -> dict:
    """Measure gates (a) and (b) (module docstring) and write them to ``<θ0>/gates.json``.

    Args:
        mixture_dir: the collapse mixture (with ``heldout/``).
        base_dir: θ0 (default ``<mixture_dir>/base``).
        work_dir: where the two gate fine-tunes are trained (removed afterwards).
        train: the frozen budget: ``lr``, ``batch_size``, ``epochs``, ``warmup_ratio`` (keywords
            of `TrainConfig`, plus ``epochs``).
        conventions: the group of gate (b): every source of these output conventions.
        seeds: the two training seeds of gate (b).
        max_new_tokens: θ0's generation limit in gate (a).
        n_paraphrases: paraphrased prompts per conversational family θ0 answers (on record).

    Returns:
        The gates' record (also in ``gates.json``), with ``passed`` for each.
    """
    mixture_dir = Path(mixture_dir)
    base = Path(base_dir) if base_dir is not None else mixture_dir / "base"
    if len(seeds) != 2 or seeds[0] == seeds[1]:
        raise ValueError(f"gate (b) compares two different seeds, got {list(seeds)}")
    group = [s for s, (_, conv) in collapse_sources().items() if conv in conventions]
    if not group:
        raise ValueError(f"no source has the conventions {list(conventions)}")
    style = _style_gate(base, mixture_dir, max_new_tokens, n_paraphrases)
    try:
        barrier = _barrier_gate(
            base, mixture_dir, Path(work_dir), group=group, seeds=seeds, train=train, alphas=alphas
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    record = {
        "theta0_plateau": read_json(base / "pretrain.json")["plateau"],
        "theta0_steps": read_json(base / "pretrain.json")["steps"],
        "a_style": style,
        "b_barrier": barrier,
        "passed": bool(style["passed"] and barrier["passed"]),
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_json(base / "gates.json", record)
    return record
