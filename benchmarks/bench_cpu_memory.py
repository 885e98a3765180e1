"""What keeping freed memory (`merit_lab.models.cpu_memory.keep_freed_memory`) does on the CPU:
time, peak memory and page faults of the gradient stage and of training, with it and without.

Each side runs in a fresh process (``--worker``), because glibc's heap keeps what one side freed
and the next side in the same process would reuse it: per round the two sides alternate in
order, each a fresh interpreter that loads the model and runs the work once (the stage without:
the library's `keep_freed_memory` replaced by one that does nothing; training, which does not
keep freed memory in the library, with: `train_branch` run inside it). Figures, medians over rounds
of kept ÷ not (the notes give the spread and both sides' medians):

* **seconds**: the stage alone (`estimate_gradients`, its config's calibration settings and
  folds), or the training loop's own time (``merit_branch.json``'s tokens ÷ tokens/s: the
  optimizer steps, not loading θ0 or writing ``final/``);
* **peak RSS** (``ru_maxrss`` of the whole process: what the heap holds on to);
* **minor page faults** (of the work alone).

Workloads: the stage on the demo base, 8 demo sources × 200 (``configs/demo.yaml``); the stage
on SmolLM2-135M-Instruct, 3 chatterbot sources × 16 (``configs/smollm2.yaml``); training a
SmolLM2 branch on 4 sources of ``configs/smollm2-collapse.yaml`` (64 examples, 4 steps of 16).
The SmolLM2 rows skip, saying why, where the model or the data are not fetched; every row skips
on a C library other than glibc.

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
SECTION = "freed memory kept (CPU)"
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
    kept = _noting(estimate, keep)
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


def train_worker(keep: bool, quick: bool) -> dict:
    """One side of the training workload: a SmolLM2 branch on 4 sources of
    ``configs/smollm2-collapse.yaml`` (64 examples, its batch of 16: 4 optimizer steps; quick: 1
    source, 1 step), trained by `train_branch` into a temporary folder, inside
    `keep_freed_memory` with ``keep`` (the library's training does not keep freed memory: this
    measured no gain, `docs/performance.md`); its own tokens/s (``merit_branch.json``: the
    optimizer steps alone, not loading or saving)."""
    import tempfile

    from merit_lab.config.schema import load_config
    from merit_lab.io import read_json
    from merit_lab.models.cpu_memory import keep_freed_memory
    from merit_lab.pipeline.rows import branch_spec
    from merit_lab.training.branch_log import MANIFEST
    from merit_lab.training.trainer import train_branch

    cfg = load_config(ROOT / "configs" / "smollm2-collapse.yaml")
    names = sorted(p.stem for p in (ROOT / cfg.mixture.path / "train").glob("*.jsonl"))
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with tempfile.TemporaryDirectory() as tmp:
        spec = branch_spec(cfg, "bench", names[: 1 if quick else 4], Path(tmp), 1.0, 0)
        t0 = time.perf_counter()
        # training does not keep freed memory itself (no gain resolved: docs/performance.md)
        with keep_freed_memory() if keep else contextlib.nullcontext(False) as kept:
            final = train_branch(spec)
        seconds = time.perf_counter() - t0
        manifest = read_json(final / MANIFEST)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": manifest["tokens"] / manifest["tokens_per_s"],  # the optimizer steps
        "wall_s": seconds,  # with loading θ0 and writing final/
        "tokens_per_s": manifest["tokens_per_s"],
        "maxrss_mb": usage.ru_maxrss / 1024,
        "minflt": usage.ru_minflt - f0,
        "kept": kept,
        "sources": len(spec.sources),
        "n": manifest["examples"],
    }


def _noting(module, keep: bool) -> list[bool]:
    """``module.keep_freed_memory`` replaced: by one that does nothing (``keep`` False), or by
    the real one noting whether it kept (in the returned one-item list)."""
    kept = [False]
    real = module.keep_freed_memory
    if not keep:
        module.keep_freed_memory = lambda device: contextlib.nullcontext(False)
        return kept

    @contextlib.contextmanager
    def noting(device):
        with real(device) as k:
            kept[0] = k
            yield k

    module.keep_freed_memory = noting
    return kept


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
    smollm2 = (fetched_model_path("smollm2") / RECORD).is_file()
    for workload in (*WORKLOADS, "train"):
        what = "training seconds" if workload == "train" else "stage seconds"
        label = "smollm2 training" if workload == "train" else workload
        need = {"smollm2": smollm2 and (ROOT / "data" / "chatterbot").is_dir(), "train": smollm2}
        if not need.get(workload, True):
            reason = "run `merit-lab fetch-model smollm2` and `merit-lab fetch-data chatterbot`"
            res.skip(SECTION, f"{label}: {what}, kept ÷ not", reason)
            continue
        sides: dict[bool, list[dict]] = {True: [], False: []}
        for rep in range(rounds):
            for keep in (True, False) if rep % 2 == 0 else (False, True):
                sides[keep].append(_side(workload, keep, quick))
                r = sides[keep][-1]
                _log(
                    f"{label} round {rep + 1} kept={r['kept']}: {r['seconds']:.1f} s, "
                    f"peak {r['maxrss_mb']:.0f} MB, {r['minflt']:,} faults"
                )
        if not sides[True][0]["kept"]:
            res.skip(SECTION, f"{label}: {what}, kept ÷ not", "not glibc: nothing kept")
            continue
        examples = "examples" if workload == "train" else "calibration examples each"
        note = f"{sides[True][0]['sources']} sources, {sides[True][0]['n']} {examples}; "
        note += f"{rounds} rounds"
        for key, name, unit in (
            ("seconds", what, "s"),
            ("maxrss_mb", "peak RSS", "MB"),
            ("minflt", "minor page faults", "faults"),
        ):
            kept = [r[key] for r in sides[True]]
            off = [r[key] for r in sides[False]]
            ratio = [k / o for k, o in zip(kept, off, strict=True)]
            res.add(
                SECTION,
                f"{label}: {name}, kept ÷ not",
                float(np.median(ratio)),
                "×",
                note=f"{note}; per round {min(ratio):.3f}-{max(ratio):.3f}; kept "
                f"{_fmt(np.median(kept), unit)}, not {_fmt(np.median(off), unit)}",
            )
        res.raw[label] = {"kept": sides[True], "not": sides[False]}
    return res


if __name__ == "__main__":
    if "--worker" in sys.argv:
        name, keep, quick = (
            sys.argv[sys.argv.index("--worker") + 1],
            "--keep" in sys.argv,
            "--quick" in sys.argv,
        )
        out = train_worker(keep, quick) if name == "train" else worker(name, keep, quick)
        print(json.dumps(out))
    else:
        bench_main(run, __doc__)
