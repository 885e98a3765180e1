"""MERIT's preprocessing as a share of branch training, on the demo.

Runs the real pipeline (``run_pipeline(..., until="train")``) on ``configs/demo.yaml`` with one
experiment, merit-2d (K = 4 branches, one epoch of the mixture between them), in a fresh run
folder, and reads the stage times from its ``timings.json``:

    overhead = (gradients + conflict + partition) / train

The paper reports 0.8% at 7B. The share is bounded by how many examples calibration reads
against how many training reads: T·n calibration examples (forward+backward, no optimizer step)
against N·epochs training examples. The demo is the worst case for it (32 × 200 calibration
examples against 8,192 training examples, 78%); the paper's 7B mixture is 176 × 200 against
1.6M (2.2%). The benchmark prints both the measured share and that projection, which is
arithmetic (no 7B run) and labelled "[projection]".

Run: python -m benchmarks.bench_overhead [--quick] [--out bench-overhead.json]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from benchmarks.common import Results, bench_main
from merit_lab.config.schema import load_config
from merit_lab.demo import DEMO_DIR
from merit_lab.pipeline import run_pipeline

SECTION = "overhead"
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
PAPER_SOURCES, PAPER_N, PAPER_EXAMPLES = 176, 200, 1_600_000  # the 7B run (merit-summary)
PAPER_OVERHEAD_PCT = 0.8


def run(quick: bool = False) -> Results:
    res = Results("overhead")
    with tempfile.TemporaryDirectory(prefix="merit-bench-") as tmp:
        overrides = {
            "name": "bench-overhead",
            "output_dir": tmp,
            "experiments": [{"name": "merit-2d"}],
            "train": {"save_steps": 10_000},
        }
        if quick:  # four sources, a few examples each: the smoke run takes seconds
            overrides["mixture"] = str(_demo_slice(Path(tmp) / "slice", 4, 16, 8))
            overrides["calibration"] = {"n": 8, "micro_batch_size": 8}
            overrides["train"] = {"batch_size": 8, "save_steps": 10_000}
        cfg = load_config(DEMO_CONFIG, **overrides)
        print("[overhead] running the demo pipeline up to train (merit-2d only)", file=sys.stderr)
        run_dir = run_pipeline(cfg, until="train")
        t = json.loads(run_dir.timings.read_text())
        mix = json.loads((run_dir.root / "mixture.json").read_text())
        cal_examples = sum(min(s["n_calibration"], cfg.calibration.n) for s in mix["sources"])
        train_examples = sum(s["n_train"] for s in mix["sources"])

    pre = t["gradients"] + t["conflict"] + t["partition"]
    share = 100 * pre / t["train"]
    ratio = cal_examples / train_examples
    paper_ratio = PAPER_SOURCES * PAPER_N / PAPER_EXAMPLES
    measured = (
        f"{pre:.1f} s of preprocessing against {t['train']:.1f} s of training; calibration "
        f"reads {cal_examples:,} examples, training {train_examples:,} ({100 * ratio:.0f}%); "
        f"the paper reports {PAPER_OVERHEAD_PCT}% at 7B"
    )
    projected = (
        "PROJECTION, not measured (no 7B run): the measured share scaled by the "
        f"calibration/training example ratio, {100 * paper_ratio:.1f}% there against "
        f"{100 * ratio:.0f}% in the demo"
    )
    res.add(
        SECTION,
        "gradients + conflict + partition ÷ branch training (demo)",
        share,
        "%",
        note=measured,
    )
    res.add(
        SECTION,
        "[projection] same share at the paper's 7B mixture (arithmetic)",
        share * paper_ratio / ratio,
        "%",
        note=projected,
    )
    res.raw = {
        "timings": t,
        "calibration_examples": cal_examples,
        "train_examples": train_examples,
        "paper": {"sources": PAPER_SOURCES, "n": PAPER_N, "examples": PAPER_EXAMPLES},
    }
    return res


def _demo_slice(out: Path, n_sources: int, n_train: int, n_cal: int) -> Path:
    """The first sources of the demo mixture, cut short, as a mixture folder of its own."""
    demo = DEMO_DIR
    meta = json.loads((demo / "sources.json").read_text())
    names = sorted(meta["sources"])[:n_sources]
    for split, n in (("train", n_train), ("calibration", n_cal), ("eval", 4)):
        (out / split).mkdir(parents=True)
        for s in names:
            lines = (demo / split / f"{s}.jsonl").read_text().splitlines()[:n]
            (out / split / f"{s}.jsonl").write_text("\n".join(lines) + "\n")
    meta["sources"] = {s: meta["sources"][s] for s in names}
    (out / "sources.json").write_text(json.dumps(meta))
    return out


if __name__ == "__main__":
    bench_main(run, __doc__)
