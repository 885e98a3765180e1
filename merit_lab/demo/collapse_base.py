"""θ0 of the short-answer collapse demo, and the two gates it passes before anything is fine-tuned.

`instruct_collapse_base` instruction-tunes the demo base (``data/demo/base``) to a plateau on θ0's
four conversational families and four of the 24 short sources (`collapse.THETA0_SHORT`), on
words outside the fresh pool. `check_collapse_gates` measures the stated gates and writes them to
``<θ0>/gates.json``:

(a) θ0 answers at least `STYLE_GATE` of the held-out conversations (``heldout/conv-*``) in style,
    counted in tokens (`evaluate.style_scores`); the paraphrases (``para-*``) are measured the same
    way and count only if they pass too;
(b) no loss barrier between two seeds' fine-tunes of one source group (`interpolation_curve` on
    the group's held-out loss): merge-readiness, the paper's diagnostic (a).
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
    "STYLE_GATE",
    "check_collapse_gates",
    "instruct_collapse_base",
    "theta0_batches",
]

STYLE_GATE = 0.95  # gate (a): θ0's least in-style share on the held-out conversations
# gate (b): a barrier counts above this share of the path's higher endpoint loss (float32 loss
# sums round at ~1e-7; the run report's interpolation rule, `BARRIER_NOISE`, is the same)
BARRIER_TOLERANCE = 1e-6


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
    short loss) and ``plateau`` (the conversational probe loss's relative change over the last
    quarter of the steps). Only response tokens are trained; AdamW with warmup and cosine decay
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
    quarter = [c["conversation"] for c in curve if c["step"] >= 0.75 * steps]
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
        "plateau": round(abs(quarter[0] - quarter[-1]) / quarter[0], 4),
        "wall_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "pretrain.json", info)
    return Path(out_dir)


def _style_gate(base: Path, mixture_dir: Path, max_new_tokens: int) -> dict:
    """Gate (a) and θ0's answers on the short sources, per held-out family and source."""
    from merit_lab.data.mixture import load_mixture
    from merit_lab.evaluation.evaluate import evaluate_model, summarize_eval
    from merit_lab.evaluation.heldout import load_heldout
    from merit_lab.models.loading import load_model, load_tokenizer

    tok, model = load_tokenizer(base), load_model(base, device="cpu")
    kw = {"label": "theta0", "max_new_tokens": max_new_tokens, "progress": False}
    held = evaluate_model(model, tok, load_heldout(mixture_dir / HELDOUT_DIR), **kw)
    short = evaluate_model(model, tok, load_mixture(mixture_dir), **kw)
    fam = {
        m: summarize_eval(held, metric=m).loc["theta0"].round(4).to_dict()
        for m in ("in_style_tokens", "no_eos", "loss")
    }
    src = held[held.metric == "in_style_tokens"].set_index("source")["value"].round(4).to_dict()
    known = short.source.isin(THETA0_SHORT)
    short_scores = {
        group: {
            m: round(float(short[(short.metric == m) & mask]["value"].mean()), 4)
            for m in ("in_style_tokens", "exact_match", "loss")
        }
        for group, mask in (("known", known), ("new", ~known))
    }
    conv, para = fam["in_style_tokens"]["conversation"], fam["in_style_tokens"]["paraphrase"]
    return {
        "threshold": STYLE_GATE,
        "conversation": conv,
        "paraphrase": para,
        "passed": conv >= STYLE_GATE,
        "paraphrases_used": conv >= STYLE_GATE and para >= STYLE_GATE,
        "per_source": src,
        "no_eos": fam["no_eos"],
        "heldout_loss": fam["loss"],
        "short_sources": short_scores,
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
    style = _style_gate(base, mixture_dir, max_new_tokens)
    try:
        barrier = _barrier_gate(
            base, mixture_dir, Path(work_dir), group=group, seeds=seeds, train=train, alphas=alphas
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    record = {
        "theta0_plateau": read_json(base / "pretrain.json")["plateau"],
        "a_style": style,
        "b_barrier": barrier,
        "passed": bool(style["passed"] and barrier["passed"]),
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_json(base / "gates.json", record)
    return record
