"""`merit-lab plan`'s output: a `RunPlan` as plain-text tables, and the SLURM jobs it would submit.

Input: a `RunPlan` (`merit_lab.training.plan`). Output: the text the command prints (model,
mixture and throughput lines; stages; memory per process; advice; disk; formulas), and for a
``train.launcher: slurm`` run the job arrays of `merit_lab.jobs.submitit_arrays`, the launcher's
own construction, unsubmitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from merit_lab.jobs import submitit_arrays
from merit_lab.training.launch import BRANCH_JOB, branch_job_name
from merit_lab.training.plan import RunPlan, TrainingRun, describe_hours

__all__ = ["format_plan", "slurm_jobs"]

FORMULAS = (
    "training fwd+bwd: 6·N·tokens (N parameters; a vision tower: 6·N_vision·merge²·image tokens)",
    "gradient stage: 6·N·(n calibration examples x T sources x their tokens)",
    "forward (evaluation, diagnostics): 2·N·tokens; a Hessian-vector product: 12·N·tokens",
    "hours = FLOPs / (MFU x peak FLOP/s) / 3600 (CPU: FLOPs / measured FLOP/s)",
    "training memory per process: fp32 weights 4N + fp32 gradients 4N + AdamW moments 8N "
    "(LoRA: 16 B per adapter parameter, base 4N frozen) + bf16 autocast copies 2N + activations",
    "activations per token and layer: a·(6h + 3kv + 4I) + 4·4h bytes (a = 2 under bf16, 4 in "
    "fp32); checkpointed: r·h per layer (r: the residual's bytes) + one layer; logits: 12·V "
    "bytes per token",
    "DDP adds 4 B per trainable parameter of buckets; FSDP divides weights, gradients and "
    "moments by N and gathers two blocks",
)


def slurm_jobs(runs: Sequence[TrainingRun], train_slurm: dict, procs: int) -> list[dict]:
    """Each submitit array `launch_branches` would submit for these runs: its parameters and
    the branch job names in it (a dry run of `merit_lab.jobs.submitit_arrays`)."""
    names = []
    for r in runs:
        names += [r.name] if r.kind == "joint" else [f"{r.name}/{k}" for k in range(r.branches)]
    arrays = submitit_arrays(
        names,
        names=[branch_job_name(n) for n in names],
        slurm=train_slurm,
        job_name=BRANCH_JOB,
        widths=[procs] * len(names),
    )
    return [{"parameters": params, "jobs": [n for n, _ in group]} for params, group in arrays]


def _si(x: float, unit: str) -> str:
    """``x`` with an SI prefix: 1.17 TFLOP, 7.5 GB."""
    for scale, prefix in (
        (1e18, "E"),
        (1e15, "P"),
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
    ):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _gb(b: float) -> str:
    return f"{b / 1e9:,.2f}" if b < 10e9 else f"{b / 1e9:,.1f}"


def _short(origin: str) -> str:
    """A folder under the working directory as a relative path; anything else as it is."""
    try:
        return str(Path(origin).resolve().relative_to(Path.cwd()))
    except ValueError:
        return origin


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str) -> list[str]:
    """Columns padded to their widest cell, "l" or "r" aligned as ``align`` says."""
    cells = [list(map(str, header)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        parts = [
            c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def format_plan(plan: RunPlan) -> str:
    """The plan as the command prints it."""
    cfg, h, tp, sizes = plan.config, plan.header, plan.throughput, plan.sizes
    unit = "GPU time" if tp.device == "gpu" else "CPU time"
    vision = f" ({_si(h.n_vision_parameters, '')} vision)" if h.n_vision_parameters else ""
    out = [
        f"merit-lab plan: {cfg.name} (model {cfg.model})",
        f"model    {h.n_parameters:,} parameters{vision}, {h.dtype}, {_si(h.nbytes, 'B')}; "
        f"header from {_short(h.origin)}",
        f"mixture  {len(sizes.sources)} sources, {sizes.total('n_train'):,} train examples, "
        f"{_si(sizes.total('train_tokens'), '')} tokens "
        f"({_si(sizes.total('train_response_tokens'), '')} response tokens: the size unit); "
        f"{sizes.basis}",
        f"device   {tp.basis}",
        "",
    ]
    rows = [
        (
            s.stage,
            _si(s.tokens, "") if s.tokens else "-",
            _si(s.flops, "FLOP") if s.flops else "-",
            describe_hours(s.hours),
            _si(s.memory.total, "B") if s.memory else "-",
            s.note,
        )
        for s in plan.stages
    ]
    total_flops = sum(s.flops for s in plan.stages)
    rows.append(("total", "", _si(total_flops, "FLOP"), describe_hours(plan.total_hours), "", ""))
    out += _table(["stage", "tokens", "FLOPs", unit, "peak/process", "note"], rows, "lrrrrl")
    out += ["", f"memory per training process (GB; {plan.gpu_memory / 1e9:.0f} GB per GPU)"]
    rows = [
        (
            label,
            _gb(m.weights),
            _gb(m.gradients),
            _gb(m.optimizer),
            _gb(m.activations),
            _gb(m.extra),
            _gb(m.total),
            "yes" if m.total <= plan.gpu_memory else "no",
        )
        for label, m in plan.memory
    ]
    head = ["option", "weights", "grads", "AdamW", "activ.", "extra", "total", "fits"]
    out += _table(head, rows, "lrrrrrrr")
    out += ["", *plan.recommendation, ""]
    rows = [(what, _si(b, "B"), how) for what, b, how in plan.disk]
    out += _table(["disk", "bytes", "how"], rows, "lrl")
    if cfg.train.launcher == "slurm":
        out += ["", "SLURM (train.launcher: slurm): the job arrays the launcher would submit"]
        for a in slurm_jobs(plan.runs, dict(cfg.train.slurm), cfg.train.procs_per_branch):
            params = ", ".join(f"{k}={v}" for k, v in sorted(a["parameters"].items()))
            out.append(f"  array of {len(a['jobs'])}: {params}")
            line = ""
            for job in a["jobs"]:  # whole names per line
                if line and len(line) + len(job) > 92:
                    out.append(f"    {line},")
                    line = ""
                line += (", " if line else "") + job
            out.append(f"    {line}")
            hours, run = max(zip(plan.branch_hours, plan.runs, strict=True), key=lambda x: x[0])
            limit = a["parameters"].get("timeout_min")
            verdict = "" if limit is None or hours * 60 <= limit else ": over timeout_min, raise it"
            took = describe_hours(hours)
            out.append(f"  the longest job: {run.name}, {took} (timeout_min={limit}{verdict})")
    out += ["", "formulas:", *(f"  {f}" for f in FORMULAS)]
    return "\n".join(out)
