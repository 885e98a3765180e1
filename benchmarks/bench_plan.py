"""`merit-lab plan` against measurements: predicted ÷ measured time, memory and disk.

Three comparisons, each re-run from what is on disk (nothing is trained here):

* **the demo** (``runs/demo``, after ``make demo``): the plan of its own ``config.yaml`` and
  ``mixture.json`` on the CPU calibration against its ``timings.json`` stage by stage, and
  against the quiet 2-core times of ``docs/performance.md`` (`QUIET_DEMO`); disk against the
  bytes of its final/, merged/ and gradients/ folders;
* **SmolLM2** (``runs/smollm2*``, the first there is; it needs ``fetch-model smollm2``): the same,
  and its quiet plain fwd+bwd rate of ``benchmarks/bench_smollm2.py`` (`QUIET_SMOLLM2_RATE`);
* **the ``make bench-gpu`` shapes** (``benchmarks/results_gpu.json``): the gradient stage's time
  and peak memory at each Qwen2.5 size, each time predicted from the *other* size's MFU (the
  calibration point itself would be exact by construction), and the merge's time.

A factor is predicted ÷ measured: above 1 the plan over-estimates. Run:
python -m benchmarks.bench_plan [--out PATH]
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

from benchmarks.common import Results, bench_main
from merit_lab.config.schema import load_config
from merit_lab.models.headers import ModelHeader, find_model_header
from merit_lab.training.cost import gradient_stage_memory
from merit_lab.training.plan import (
    CPU_CALIBRATION,
    GPU_CALIBRATION,
    H100_BF16_PEAK,
    MERGE_BYTES_PER_S,
    plan_run,
)
from merit_lab.training.sizes import sizes_from_record

ROOT = Path(__file__).resolve().parent.parent
# `make demo` on 2 quiet CPU cores (docs/performance.md, "Wall times of the two commands")
QUIET_DEMO = {"gradients": 10.0, "train": 125.0, "merge": 0.5, "evaluate": 15.0, "diagnose": 54.0}
# SmolLM2-135M plain training fwd+bwd on 2 CPU cores (docs/performance.md, "SmolLM2-135M")
QUIET_SMOLLM2_RATE = 190.5
STAGES = ("gradients", "train", "merge", "evaluate", "diagnose")


def _weights(folder: Path) -> int:
    """Data bytes of every safetensors file under ``folder`` (each file less its header)."""
    total = 0
    for f in folder.rglob("*.safetensors"):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        total += f.stat().st_size - 8 - n
    return total


def _stage_seconds(plan) -> dict[str, float]:
    out = dict.fromkeys(STAGES, 0.0)
    for s in plan.stages:
        word = s.stage.split(" ")[0]
        key = "gradients" if word in ("gradients", "LoRA") else word
        if key in out:
            out[key] += s.hours * 3600
    return out


def compare_run(res: Results, run: Path, section: str, quiet: dict[str, float] | None) -> dict:
    """Plan a finished run from its own config and mixture.json; add the factors."""
    cfg = load_config(run / "config.yaml")
    if hasattr(cfg.calibration, "folds") and not (run / "gradients" / "folds.safetensors").exists():
        # a run made before fold rows existed: plan the bank it holds (its config loads the
        # default calibration.folds of today's code)
        cfg = dataclasses.replace(cfg, calibration=dataclasses.replace(cfg.calibration, folds=1))
    header = find_model_header(cfg.model)
    sizes = sizes_from_record(json.loads((run / "mixture.json").read_text()), cfg, str(run))
    plan = plan_run(cfg, header, sizes, device="cpu")
    predicted = _stage_seconds(plan)
    timings = json.loads((run / "timings.json").read_text())
    for stage in STAGES:
        if stage not in timings or not predicted[stage]:
            continue
        factor = predicted[stage] / timings[stage]
        note = f"plan {predicted[stage]:.3g} s, timings.json {timings[stage]:.3g} s"
        if quiet and stage in quiet:
            note += f"; quiet {quiet[stage]:.3g} s: {predicted[stage] / quiet[stage]:.2f}x"
        res.add(section, f"{stage}: time, plan / timings.json", factor, "×", note=note)
    disk = {what.split(":")[0]: b for what, b, _ in plan.disk}
    finals = _weights(run / "joint") + _weights(run / "branches")
    res.add(
        section,
        "disk: final weights, plan / bytes",
        disk["final weights"] / finals,
        "×",
        note=f"{disk['final weights']:,} vs {finals:,} B (safetensors data)",
    )
    merged = _weights(run / "merged") + _weights(run / "controls")
    res.add(
        section,
        "disk: merged + control rows, plan / bytes",
        disk["merged rows"] / merged,
        "×",
        note=f"{disk['merged rows']:,} vs {merged:,} B",
    )
    bank = sum(f.stat().st_size for f in (run / "gradients").rglob("*.safetensors"))
    res.add(
        section,
        "disk: gradient bank, plan / bytes",
        disk["gradient bank"] / bank,
        "×",
        note=f"{disk['gradient bank']:,} vs {bank:,} B (files with headers)",
    )
    return {"predicted_s": predicted, "timings": timings, "n_parameters": header.n_parameters}


def _bench_header(entry: dict[str, Any]) -> ModelHeader:
    return ModelHeader(entry["config"], {"w": ("BF16", (entry["parameters"],))}, "bench-gpu")


def compare_gpu(res: Results) -> dict:
    """The bench-gpu shapes: gradient stage time from the other size's MFU, peak memory, merge."""
    data = json.loads((ROOT / "benchmarks" / "results_gpu.json").read_text())["sizes"]
    mfus = {n: 6 * n * rate / H100_BF16_PEAK for n, rate in GPU_CALIBRATION}
    raw = {}
    for size, entry in data.items():
        n = entry["parameters"]
        other = next(m for k, m in mfus.items() if k != n)
        bf16 = entry["bf16"]
        predicted = 6 * n * bf16["tokens"] / (other * H100_BF16_PEAK)
        for side in ("plain", "stage"):
            measured = bf16[side]["median_s"]
            res.add(
                f"bench-gpu {size}",
                f"{side} time, plan (other size's MFU {other:.1%}) / measured",
                predicted / measured,
                "×",
                note=f"{predicted:.2f} s vs {measured:.2f} s, {bf16['tokens']:,} tokens",
            )
        mem = gradient_stage_memory(
            _bench_header(entry),
            tokens=bf16["micro_batching"]["tokens"],
            dtype_bytes=2,
            checkpointing=False,
        )
        for side in ("plain", "stage"):
            measured = bf16["peak_bytes"][side]
            res.add(
                f"bench-gpu {size}",
                f"peak memory {side}, plan / measured",
                mem.total / measured,
                "×",
                note=f"{mem.total / 2**30:.1f} vs {measured / 2**30:.1f} GiB",
            )
        merge = entry["merge"]
        predicted_merge = (merge["bytes_read"] + merge["bytes_written"]) / MERGE_BYTES_PER_S
        res.add(
            f"bench-gpu {size}",
            "merge time, plan / measured",
            predicted_merge / merge["merge_median_s"],
            "×",
            note=f"{predicted_merge:.2f} s vs {merge['merge_median_s']:.2f} s (K = {merge['k']})",
        )
        raw[size] = {"predicted_stage_s": predicted, "memory": mem.total}
    return raw


def run(quick: bool = False) -> Results:
    res = Results("plan")
    demo = ROOT / "runs" / "demo"
    if (demo / "timings.json").is_file():
        res.raw["demo"] = compare_run(res, demo, "demo", QUIET_DEMO)
    else:
        res.skip("demo", "plan / measured", "no runs/demo: run `make demo` first")
    smol = sorted(p for p in (ROOT / "runs").glob("smollm2*") if (p / "timings.json").is_file())
    if smol:
        try:
            res.raw["smollm2"] = compare_run(res, smol[0], smol[0].name, None)
            n = res.raw["smollm2"]["n_parameters"]
            flops = 6 * CPU_CALIBRATION[0] * CPU_CALIBRATION[1]
            res.add(
                smol[0].name,
                "fwd+bwd rate, plan / quiet bench_smollm2",
                flops / (6 * n) / QUIET_SMOLLM2_RATE,
                "×",
                note=f"plan {flops / (6 * n):.0f} tok/s vs {QUIET_SMOLLM2_RATE} tok/s measured",
            )
        except FileNotFoundError as e:
            res.skip(smol[0].name, "plan / measured", str(e).splitlines()[0])
    else:
        res.skip("smollm2", "plan / measured", "no runs/smollm2*: run configs/smollm2.yaml first")
    res.raw["gpu"] = compare_gpu(res)
    return res


if __name__ == "__main__":
    bench_main(run, __doc__)
