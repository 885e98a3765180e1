"""LoRA gradient bank vs the full-parameter bank on the demo: does the LESS way see the same
conflicts?

The demo's mixture and base (``configs/demo.yaml``: 32 sources, n = 200 calibration examples,
count-sketch 2^18 at seed 0) give the full bank: each source's gradient over all 653k parameters
at θ0. The LoRA bank (``calibration.lora_warmup_steps: N`` with ``configs/demo-lora.yaml``'s LoRA:
r = 8, alpha = 16, every linear layer) first warms a LoRA adapter up on the pooled train splits
for N seeded AdamW steps (batch 32, lr 2e-3), then takes each source's gradient on the adapter's
A and B matrices only, at θ0 + adapter, sketched the same way. Agreement of the two banks:
Pearson correlation of the upper triangles of their cosine matrices, and the adjusted Rand index
of their balanced MERIT partitions at r = 1 and r = 2 (1.0: the same groups). Swept over N.

Banks are cached in ``.bench/lora_bank/`` (per-source parts), so a rerun only recomputes what
changed. Run: .venv/bin/python -m benchmarks.bench_lora_bank [--quick]; writes
``benchmarks/results_lora_bank.json``.
"""

from __future__ import annotations

import argparse
import platform
import time
from math import comb
from pathlib import Path

import numpy as np
import torch

from merit_lab.analysis.conflict import compute_conflict_space
from merit_lab.config.schema import load_config
from merit_lab.data.formatting import tokenize_examples
from merit_lab.data.mixture import load_mixture
from merit_lab.gradients.estimate import estimate_gradients
from merit_lab.gradients.lora_bank import (
    WARMUP_RECORD,
    load_lora_model,
    warm_up_for_run,
    warmup_info,
)
from merit_lab.io import atomic_write_json, read_json
from merit_lab.models.checkpoints import fingerprint_checkpoint
from merit_lab.models.loading import load_model, load_tokenizer, resolve_model_path
from merit_lab.partition.methods import split_balanced

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench" / "lora_bank"
OUT = ROOT / "benchmarks" / "results_lora_bank.json"
STEPS = (100, 10)  # warm-up steps swept (--quick: the first only)


def adjusted_rand_index(a: list[int], b: list[int]) -> float:
    """Hubert & Arabie's ARI of two labelings of the same items (1: identical groupings)."""
    pairs = {}
    for x, y in zip(a, b, strict=True):
        pairs[x, y] = pairs.get((x, y), 0) + 1
    rows = [sum(v for (x, _), v in pairs.items() if x == i) for i in set(a)]
    cols = [sum(v for (_, y), v in pairs.items() if y == j) for j in set(b)]
    index = sum(comb(v, 2) for v in pairs.values())
    ra, cb, n = sum(comb(v, 2) for v in rows), sum(comb(v, 2) for v in cols), comb(len(a), 2)
    expected = ra * cb / n
    top = (ra + cb) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


def axis_corr(a, b, i: int, j: int) -> float:
    """|Pearson| of PCA axis i's scores in space a and axis j's in space b (signs are arbitrary)."""
    return round(abs(float(np.corrcoef(a.embedding[:, i], b.embedding[:, j])[0, 1])), 4)


def _labels(part, names) -> list[int]:
    group = {s: g for g, members in enumerate(part.groups) for s in members}
    return [group[s] for s in names]


def _timed(name: str, seconds: float, computed: bool) -> float:
    """Wall seconds of a computation; a rerun that reads it from the cache reports the time it
    took when it was computed (kept in ``.bench/lora_bank/seconds.json``)."""
    path = CACHE / "seconds.json"
    known = read_json(path) if path.is_file() else {}
    if computed or name not in known:
        known[name] = round(seconds, 1)
        atomic_write_json(path, known)
    return known[name]


def _bank(cfg, mixture, tok, fingerprint: str, folder: Path, adapter: Path | None):
    model = load_model(resolve_model_path(cfg.model), device="cpu", dtype="float32")
    lora = None
    if adapter is not None:
        model, lora = load_lora_model(model, adapter), warmup_info(adapter)
    cal = cfg.calibration
    t0 = time.perf_counter()
    bank = estimate_gradients(
        model,
        tok,
        mixture,
        sketch=cfg.sketch,
        n=cal.n,
        micro_batch_size=cal.micro_batch_size,
        max_length=cal.max_length,
        long_examples=cfg.mixture.long_examples,
        model_fingerprint=fingerprint,
        out_dir=folder,
        lora=lora,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    return bank, _timed(folder.name, seconds, bank.info["throughput"]["sources"] > 0)


def run(quick: bool = False) -> dict:
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    base = resolve_model_path(cfg.model)
    fingerprint = fingerprint_checkpoint(base)
    m = cfg.mixture
    mixture = load_mixture(
        m.path,
        source_column=m.source_column,
        calibration_n=cfg.calibration.n,
        eval_fraction=m.eval_fraction,
        seed=cfg.seed,
        split=m.split,
    )
    tok = load_tokenizer(base)
    names = list(mixture.names)
    examples = {s.name: len(s.train) for s in mixture}
    tokens = {
        s.name: sum(e.n_tokens for e in tokenize_examples(tok, s.train, 256)) for s in mixture
    }
    keys = {s: s for s in names}  # the bundled demo: its files are the keys' content

    full, full_s = _bank(cfg, mixture, tok, fingerprint, CACHE / "full", None)
    space = compute_conflict_space(full.rows, full.names)
    parts = {r: split_balanced(space, examples, tokens, r=r) for r in (1, 2)}
    iu = np.triu_indices(len(names), 1)
    out = {
        "command": ".venv/bin/python -m benchmarks.bench_lora_bank" + (" --quick" if quick else ""),
        "machine": {"cpu": platform.machine(), "torch_threads": torch.get_num_threads()},
        "full_bank": {"n_parameters": full.info["n_parameters"], "seconds": full_s},
        "lora": {},
    }
    for steps in STEPS[:1] if quick else STEPS:
        lcfg = load_config(
            ROOT / "configs" / "demo-lora.yaml", calibration={"lora_warmup_steps": steps}
        )
        t0, cached = time.perf_counter(), (CACHE / f"warmup-{steps}" / WARMUP_RECORD).is_file()
        adapter = warm_up_for_run(lcfg, mixture, CACHE / f"warmup-{steps}", base, fingerprint, keys)
        warm_s = _timed(f"warmup-{steps}", time.perf_counter() - t0, not cached)
        bank, bank_s = _bank(lcfg, mixture, tok, fingerprint, CACHE / f"lora-{steps}", adapter)
        lspace = compute_conflict_space(bank.rows, bank.names)
        pearson = float(np.corrcoef(space.cosine[iu], lspace.cosine[iu])[0, 1])
        ari = {
            f"r{r}": adjusted_rand_index(
                _labels(parts[r], names),
                _labels(split_balanced(lspace, examples, tokens, r=r), names),
            )
            for r in (1, 2)
        }
        out["lora"][str(steps)] = {
            "cosine_pearson": round(pearson, 4),
            "ari": {k: round(v, 4) for k, v in ari.items()},
            "max_abs_cosine_diff": round(float(np.abs(space.cosine - lspace.cosine).max()), 4),
            # |Pearson| of the first two PCA axes' scores (rows: full axes, columns: LoRA axes):
            # an ARI of 1 at r = 2 beside a low one at r = 1 is the two axes swapping places
            "axis_correlation": [[axis_corr(space, lspace, i, j) for j in (0, 1)] for i in (0, 1)],
            "explained_variance_first_two": {
                "full": [round(float(v), 4) for v in space.explained_variance_ratio[:2]],
                "lora": [round(float(v), 4) for v in lspace.explained_variance_ratio[:2]],
            },
            "n_parameters": bank.info["n_parameters"],
            "warmup_seconds": warm_s,  # when computed (a rerun reads the adapter from the cache)
            "bank_seconds": bank_s,
        }
        atomic_write_json(OUT, out)  # after each length: a cut sweep keeps what it measured
        print(
            f"warm-up {steps:4d} steps: cosine Pearson {pearson:.4f}, ARI r=1 {ari['r1']:.4f}, "
            f"r=2 {ari['r2']:.4f}"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one warm-up length only")
    run(parser.parse_args().quick)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
