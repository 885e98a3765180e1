"""What keeping freed memory (`merit_lab.models.cpu_memory.keep_freed_memory`) does to the CPU
gradient stage: time, peak memory and page faults, with it and without.

Each side runs in a fresh process (``--worker``), because glibc's heap keeps what one side freed
and the next side in the same process would reuse it: per round the two sides alternate in
order, each a fresh interpreter that loads the model and runs `estimate_gradients` once with its
config's calibration settings and folds (without: the stage's `keep_freed_memory` replaced by
one that does nothing). Figures, medians over rounds (the notes give the spread):

* **stage seconds, kept ÷ not** (the stage alone, not the model's loading);
* **peak RSS, kept ÷ not** (``ru_maxrss`` of the whole process: the memory the heap holds on to);
* **minor page faults in the stage, kept ÷ not**.

Workloads: the demo base on 8 demo sources × 200 (``configs/demo.yaml``), and SmolLM2-135M-
Instruct on 3 chatterbot sources × 16 (``configs/smollm2.yaml``; skipped, saying why, where the
model or the data are not fetched). Skipped on a C library other than glibc.

Run: python -m benchmarks.bench_cpu_memory [--quick] [--out bench-cpu-memory.json]
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Results, bench_main

ROOT = Path(__file__).resolve().parents[1]
SECTION = "freed memory kept (CPU gradient stage)"
WORKLOADS = {"demo": ("demo.yaml", 8), "smollm2": ("smollm2.yaml", 3)}


def _log(msg: str) -> None:
    print(f"[cpu-memory] {msg}", file=sys.stderr, flush=True)


def _fmt(v: float, unit: str) -> str:
    return f"{v:.1f} {unit}" if unit == "s" else f"{v:,.0f} {unit}"


def worker(workload: str, keep: bool, quick: bool) -> dict:
    """One side, in this process: load, run the stage once, report seconds, RSS and faults."""
    import torch

    from merit_lab.config.schema import load_config
    from merit_lab.data.mixture import load_mixture
    from merit_lab.gradients import estimate
    from merit_lab.models.loading import load_model, load_tokenizer

    cfg = load_config(ROOT / "configs" / WORKLOADS[workload][0])
    cal = cfg.calibration
    tok, model = load_tokenizer(cfg.model), load_model(cfg.model, device="cpu")
    mix = load_mixture(
        cfg.mixture.path, calibration_n=cal.n, eval_fraction=cfg.mixture.eval_fraction
    )
    n = 8 if quick else cal.n
    mix = mix.select(mix.names[: 2 if quick else WORKLOADS[workload][1]])
    kept = [False]
    if not keep:
        estimate.keep_freed_memory = lambda device: contextlib.nullcontext(False)
    else:
        real = estimate.keep_freed_memory

        @contextlib.contextmanager
        def noting(device):
            with real(device) as k:
                kept[0] = k
                yield k

        estimate.keep_freed_memory = noting
    torch.manual_seed(0)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    estimate.estimate_gradients(
        model,
        tok,
        mix,
        n=n,
        micro_batch_size=cal.micro_batch_size,
        max_length=cal.max_length,
        folds=min(cal.folds, n),
        progress=False,
    )
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": seconds,
        "maxrss_mb": usage.ru_maxrss / 1024,
        "minflt": usage.ru_minflt - f0,
        "kept": kept[0],
        "sources": len(mix),
        "n": n,
    }


def _side(workload: str, keep: bool, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_cpu_memory", "--worker", workload]
    cmd += ["--keep"] if keep else []
    cmd += ["--quick"] if quick else []
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> Results:
    from merit_lab.models.fetch import RECORD, fetched_model_path

    res = Results("cpu_memory")
    rounds = 1 if quick else 3
    for workload in WORKLOADS:
        if workload == "smollm2" and not (
            (fetched_model_path("smollm2") / RECORD).is_file()
            and (ROOT / "data" / "chatterbot").is_dir()
        ):
            reason = "run `merit-lab fetch-model smollm2` and `merit-lab fetch-data chatterbot`"
            res.skip(SECTION, "SmolLM2 stage seconds, kept ÷ not", reason)
            continue
        sides: dict[bool, list[dict]] = {True: [], False: []}
        for rep in range(rounds):
            for keep in (True, False) if rep % 2 == 0 else (False, True):
                sides[keep].append(_side(workload, keep, quick))
                r = sides[keep][-1]
                _log(
                    f"{workload} round {rep + 1} kept={r['kept']}: {r['seconds']:.1f} s, "
                    f"peak {r['maxrss_mb']:.0f} MB, {r['minflt']:,} faults"
                )
        if not sides[True][0]["kept"]:
            res.skip(SECTION, f"{workload} stage seconds, kept ÷ not", "not glibc: nothing kept")
            continue
        note = f"{sides[True][0]['sources']} sources x {sides[True][0]['n']}; {rounds} rounds"
        for key, what, unit in (
            ("seconds", "stage seconds", "s"),
            ("maxrss_mb", "peak RSS", "MB"),
            ("minflt", "minor page faults in the stage", "faults"),
        ):
            kept = [r[key] for r in sides[True]]
            off = [r[key] for r in sides[False]]
            ratio = [k / o for k, o in zip(kept, off, strict=True)]
            res.add(
                SECTION,
                f"{workload}: {what}, kept ÷ not",
                float(np.median(ratio)),
                "×",
                note=f"{note}; per round {min(ratio):.3f}-{max(ratio):.3f}; kept "
                f"{_fmt(np.median(kept), unit)}, not {_fmt(np.median(off), unit)}",
            )
        res.raw[workload] = {"kept": sides[True], "not": sides[False]}
    return res


if __name__ == "__main__":
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        print(json.dumps(worker(sys.argv[i + 1], "--keep" in sys.argv, "--quick" in sys.argv)))
    else:
        bench_main(run, __doc__)
