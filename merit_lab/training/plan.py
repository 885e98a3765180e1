"""A run's cost before launch: tokens, FLOPs, GPU-hours, memory and disk, stage by stage.

Input: a `RunConfig`, its model's `ModelHeader` (`merit_lab.models.headers`) and the mixture's
`MixtureSizes` (`merit_lab.training.sizes`). Output: `RunPlan`, which `format_plan` prints as
tables; the formulas are in `merit_lab.training.cost`, the calibration constants below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from merit_lab.config.schema import RunConfig
from merit_lab.models.headers import ModelHeader
from merit_lab.training.cost import (
    Memory,
    forward_flops,
    gradient_stage_memory,
    training_flops,
)
from merit_lab.training.footprint import (
    ExampleShape,
    branch_memory,
    disk_items,
    is_mixed,
    memory_options,
    recommend,
)
from merit_lab.training.sizes import MixtureSizes

__all__ = [
    "CPU_CALIBRATION",
    "GPU_CALIBRATION",
    "H100_BF16_PEAK",
    "MERGE_BYTES_PER_S",
    "RunPlan",
    "StageCost",
    "Throughput",
    "TrainingRun",
    "calibrated_throughput",
    "describe_hours",
    "plan_run",
    "training_runs",
]

# Dense bf16 peak of an H100 SXM (NVIDIA's datasheet: 1,979 TFLOP/s is with 2:4 sparsity).
H100_BF16_PEAK = 989.4e12
# `make bench-gpu` (benchmarks/results_gpu.json, one H100 80GB HBM3): plain bf16 fwd+bwd tokens/s
# of Qwen2.5-0.5B- and -1.5B-shaped models, (parameters, tokens/s); MFU = 6·N·rate / peak.
GPU_CALIBRATION = ((494_032_768, 65_685.25557642967), (1_543_714_304, 33_569.87464213419))
# `make bench` (benchmarks/results.json, 2 CPU cores): plain fwd+bwd of the 653k-parameter demo
# base, 233,522 tokens in 13.38 s; the CPU has no stated peak, so its achieved FLOP/s is used.
CPU_CALIBRATION = (653_056, 233_522 / 13.381941874016775)
# merge_checkpoints' bytes read + written per second: the mean of 0.69 and 0.91 GB/s
# (`make bench-gpu`'s 0.5B and 1.5B merges) and 0.91 GB/s (`make bench`, CPU)
MERGE_BYTES_PER_S = 0.84e9
HVP_FORWARDS = 6  # a Hessian-vector product ≈ 2 forward+backward passes = 6 forwards' FLOPs


# ------------------------------------------------------------------------------------ the runs
@dataclass(frozen=True)
class TrainingRun:
    """One trained model group: a joint run (1 branch) or a split experiment's K branches."""

    name: str  # the joint folder (ep1-s0) or the experiment's row name
    kind: str  # joint | split
    branches: int
    epochs: float
    seed: int


def _groups(cfg: RunConfig, exp, n_sources: int) -> int:
    part = cfg.partition if exp.method is None else exp
    k = part.k if part.k is not None else 2 ** (part.r or 0)
    return max(1, min(k, n_sources))


def training_runs(cfg: RunConfig, n_sources: int) -> list[TrainingRun]:
    """Every model the run trains, from the config alone: joint runs once per (epochs, seed)
    (a soup's members included), split experiments' K branches, each repeated under every one
    of ``train.seeds`` (soups are not repeated; controls train nothing)."""
    joint: dict[tuple[float, int], TrainingRun] = {}
    splits: list[TrainingRun] = []
    for seed in (cfg.train.seed, *cfg.train.seeds):
        mark = "" if seed == cfg.train.seed else f"@s{seed}"
        for exp in cfg.experiments:
            if exp.kind == "joint":
                joint.setdefault(
                    (exp.epochs, seed),
                    TrainingRun(f"ep{exp.epochs:g}-s{seed}", "joint", 1, exp.epochs, seed),
                )
            elif exp.kind == "soup" and not mark:
                for s in exp.seeds:
                    run = TrainingRun(f"ep{exp.epochs:g}-s{s}", "joint", 1, exp.epochs, s)
                    joint.setdefault((exp.epochs, s), run)
            elif exp.kind == "split":
                k = _groups(cfg, exp, n_sources)
                splits.append(TrainingRun(exp.name + mark, "split", k, exp.epochs, seed))
    return [*joint.values(), *splits]


def _merged_rows(cfg: RunConfig, runs: Sequence[TrainingRun]) -> list[tuple[str, int]]:
    """(row, models it averages) of every merge: each split run under each merge method, and
    each soup."""
    merges = {e.name: len(e.merges) for e in cfg.experiments if e.kind == "split"}
    rows = []
    for r in runs:
        if r.kind == "split":
            base = r.name.split("@s")[0]
            rows += [(f"{r.name}#{i}", r.branches) for i in range(merges[base])]
    rows += [(e.name, len(e.seeds)) for e in cfg.experiments if e.kind == "soup"]
    return rows


def _controls(cfg: RunConfig, merged: Sequence[tuple[str, int]]) -> int:
    """Control rows (shrink, early): one model per merged row they control."""
    kinds = ("shrink", "early")
    return sum(len(e.of) or len(merged) for e in cfg.experiments if e.kind in kinds)


# ------------------------------------------------------------------------------ the throughput
@dataclass(frozen=True)
class Throughput:
    """Achieved FLOP/s the plan divides by, and where it comes from."""

    device: str  # "gpu" | "cpu"
    flops_per_s: float
    mfu: float | None  # model FLOPs utilisation (gpu), of `peak`
    peak: float | None
    basis: str


def gpu_mfu(n_params: int) -> float:
    """MFU of a model of ``n_params``: `GPU_CALIBRATION`'s MFUs interpolated in log N, the
    nearest measured size's outside their range."""
    (n0, r0), (n1, r1) = GPU_CALIBRATION
    m0, m1 = 6 * n0 * r0 / H100_BF16_PEAK, 6 * n1 * r1 / H100_BF16_PEAK
    x = (math.log(n_params) - math.log(n0)) / (math.log(n1) - math.log(n0))
    return m0 + (m1 - m0) * min(max(x, 0.0), 1.0)


def calibrated_throughput(
    device: str, n_params: int, *, mfu: float | None = None, peak: float | None = None
) -> Throughput:
    """The FLOP/s a stage runs at: on a GPU, ``mfu x peak`` (``mfu`` from `gpu_mfu` unless
    given; ``peak`` H100 bf16 unless given); on the CPU the measured `CPU_CALIBRATION`."""
    if device == "cpu":
        n, rate = CPU_CALIBRATION
        flops = 6 * n * rate
        basis = f"2 CPU cores, {flops / 1e9:.0f} GFLOP/s measured (make bench: demo base fwd+bwd)"
        return Throughput("cpu", flops, None, None, basis)
    peak = peak or H100_BF16_PEAK
    given = mfu is not None
    mfu = mfu if given else gpu_mfu(n_params)
    (n0, r0), (n1, r1) = GPU_CALIBRATION
    basis = f"MFU {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s" + (
        " (given)"
        if given
        else f" (make bench-gpu, H100 bf16 fwd+bwd: {6 * n0 * r0 / H100_BF16_PEAK:.1%} at "
        f"{n0 / 1e9:.2f}B, {6 * n1 * r1 / H100_BF16_PEAK:.1%} at {n1 / 1e9:.2f}B; "
        "interpolated in log N, the nearest size outside)"
    )
    return Throughput("gpu", mfu * peak, mfu, peak, basis)


# ------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class StageCost:
    stage: str
    tokens: float  # tokens processed (forward or forward+backward, as the formula says)
    flops: float
    hours: float  # device-hours at the plan's throughput (GPU-hours on a GPU)
    formula: str
    memory: Memory | None = None  # peak per process, where the stage has one to state
    note: str = ""


@dataclass(frozen=True)
class RunPlan:
    config: RunConfig
    header: ModelHeader
    sizes: MixtureSizes
    throughput: Throughput
    runs: tuple[TrainingRun, ...]
    stages: tuple[StageCost, ...]
    memory: tuple[tuple[str, Memory], ...]  # training options: (label, peak per process)
    disk: tuple[tuple[str, float, str], ...]  # (what, bytes, how counted)
    recommendation: tuple[str, ...]
    gpu_memory: float
    gpus: int
    # per run (as `runs`): the wall hours of one of its branches on procs_per_branch processes
    branch_hours: tuple[float, ...] = field(default=())

    @property
    def total_hours(self) -> float:
        return sum(s.hours for s in self.stages)


def _stage(name, tokens, flops, tp, formula, memory=None, note="") -> StageCost:
    return StageCost(name, tokens, flops, flops / tp.flops_per_s / 3600, formula, memory, note)


def _flops_6n(header: ModelHeader, tokens: float, image_tokens: float, merge: int) -> float:
    """fwd+bwd FLOPs of ``tokens`` language-model tokens, ``image_tokens`` of them from images:
    ``6·N_text·tokens + 6·N_vision·merge²·image_tokens`` (a vision tower sees merge² patches
    per image token)."""
    n_vis = header.n_vision_parameters
    return training_flops(header.n_parameters - n_vis, tokens) + training_flops(
        n_vis, merge**2 * image_tokens
    )


def describe_hours(h: float) -> str:
    """A duration in the unit that reads best: 12 s, 3.4 min, 1.33 h."""
    s = h * 3600
    return f"{s:.2g} s" if s < 60 else f"{s / 60:.2g} min" if s < 3600 else f"{h:,.3g} h"


def _shape(sizes: MixtureSizes) -> ExampleShape:
    return ExampleShape(sizes.longest, sizes.image_tokens_per_example())


def _training_stages(cfg, header, sizes, runs, tp, merge) -> list[StageCost]:
    """One row per experiment (its seed variants together): tokens, FLOPs and GPU-hours of all
    its models, and in the note what one branch takes (its wall time on one process)."""
    total, images = sizes.total("train_tokens"), sizes.total("image_tokens")
    t = cfg.train
    mem = branch_memory(
        cfg,
        header,
        tp.device,
        lora=t.lora_r,
        gc=t.gradient_checkpointing,
        procs=t.procs_per_branch,
        dist=t.distributed,
        shape=_shape(sizes),
    )
    groups: dict[tuple[str, str, float], list[TrainingRun]] = {}
    for r in runs:
        epochs = f"{r.epochs:g} epoch" + ("" if r.epochs == 1 else "s")
        key = r.name.split("@s")[0] if r.kind == "split" else f"joint, {epochs}"
        groups.setdefault((r.kind, key, r.epochs), []).append(r)
    out = []
    for (kind, key, epochs), group in groups.items():
        k, n = group[0].branches, len(group)
        tokens = n * epochs * total
        flops = n * _flops_6n(header, epochs * total, epochs * images, merge)
        seeds = f", {n} seeds" if n > 1 else ""
        label = f"train {key}" + (f" (K={k}{seeds})" if kind == "split" else f" ({n} runs)")
        per = describe_hours(flops / (n * k) / tp.flops_per_s / 3600)
        note = f"{tokens / (n * k):,.0f} tokens, {per} a " + ("branch" if k > 1 else "run")
        out.append(_stage(label, tokens, flops, tp, "6·N·tokens", mem, note))
    return out


def _eval_stage(cfg, header, sizes, n_rows, tp) -> StageCost:
    mean = sizes.mean_tokens()
    per_row = 0.0
    for s in sizes.sources:
        for split in cfg.eval.splits:
            n = s.n_eval if split == "eval" else s.n_train if split == "train" else 0
            per_row += min(n, cfg.eval.max_examples or n) * mean
        if cfg.eval.exact_match:
            n = min(s.n_eval, cfg.eval.max_examples or s.n_eval)
            per_row += n * (mean + cfg.eval.max_new_tokens)
    tokens = n_rows * per_row
    harness = getattr(cfg.eval, "lm_eval", None) or getattr(cfg.eval, "lmms_eval", None)
    note = "lm-eval / lmms-eval tasks not counted" if harness else ""
    note = note or "generation is memory-bound: a lower bound"
    return _stage(
        f"evaluate ({n_rows} rows)",
        tokens,
        forward_flops(header.n_parameters, tokens),
        tp,
        "2·N·(loss + prompt + generated tokens)",
        note=note,
    )


def _diagnose_stage(cfg, header, sizes, runs, tp) -> StageCost | None:
    d = cfg.diagnostics
    chosen = [r for r in runs if r.kind == "split" and "@s" not in r.name]
    if d.experiments:
        chosen = [r for r in chosen if r.name in d.experiments]
    if not chosen:
        return None
    joints = sum(r.kind == "joint" for r in runs)
    n_src, mean = len(sizes.sources), sizes.mean_tokens()
    loss_tokens = n_src * d.max_examples * mean  # one loss: max_examples per source
    fwd = 0.0
    for r in chosen:
        k = r.branches
        paths = k * (k - 1) // 2 + k + 1 + (1 if joints else 0)
        fwd += paths * d.alphas * 2 * loss_tokens  # train + eval loss at each α
        fwd += (1 + joints + k) * len(d.sigmas) * len(d.seeds) * loss_tokens
    cal = sizes.total("calibration_tokens") / max(sizes.total("n_calibration"), 1)
    hvp = d.hessian_iter * n_src * d.curvature_examples * cal
    tokens = fwd + HVP_FORWARDS * hvp
    return _stage(
        f"diagnose ({len(chosen)} experiment{'s' if len(chosen) > 1 else ''})",
        tokens,
        forward_flops(header.n_parameters, tokens),
        tp,
        "2·N·(path + noise loss tokens) + 12·N·Lanczos HVP tokens",
    )


def plan_run(
    cfg: RunConfig,
    header: ModelHeader,
    sizes: MixtureSizes,
    *,
    device: str = "gpu",
    gpu_memory: float = 80e9,
    gpus: int = 8,
    mfu: float | None = None,
    peak: float | None = None,
) -> RunPlan:
    """Every stage's tokens, FLOPs and hours, training memory per process and disk."""
    tp = calibrated_throughput(device, header.n_parameters, mfu=mfu, peak=peak)
    merge = int((header.config.get("vision_config") or {}).get("spatial_merge_size", 1))
    n_src = len(sizes.sources)
    runs = training_runs(cfg, n_src)
    cal_tokens = sizes.total("calibration_tokens")
    cal_images = sizes.total("image_tokens") * cal_tokens / max(sizes.total("train_tokens"), 1)
    c = cfg.calibration
    length = min(sizes.longest, c.max_length) if sizes.longest else c.max_length
    micro = c.micro_batch_tokens or c.micro_batch_size * length
    grad_mem = gradient_stage_memory(
        header,
        tokens=micro,
        dtype_bytes=(2 if is_mixed(cfg, device) else 4),
        checkpointing=c.gradient_checkpointing,
        patches=merge**2 * sizes.image_tokens_per_example() * micro / length,
    )
    stages = [
        _stage(
            f"gradients ({n_src} sources x n={c.n})",
            cal_tokens,
            _flops_6n(header, cal_tokens, cal_images, merge),
            tp,
            "6·N·calibration tokens",
            grad_mem,
            f"{c.workers} worker(s): {1 / c.workers:.2g}x the wall time" if c.workers > 1 else "",
        ),
    ]
    if c.lora_warmup_steps:
        warm = c.lora_warmup_steps * cfg.train.batch_size * cfg.train.grad_accum
        tokens = warm * sizes.mean_tokens()
        stages.append(
            _stage("LoRA warm-up", tokens, _flops_6n(header, tokens, 0, merge), tp, "6·N·tokens")
        )
    dim = cfg.sketch.dim if cfg.sketch.kind in ("countsketch", "gaussian") else 0
    gram = 2.0 * n_src**2 * dim
    stages.append(StageCost("conflict + partition", 0, gram, 0.0, "2·T²·d (Gram), CPU: seconds"))
    stages += _training_stages(cfg, header, sizes, runs, tp, merge)
    merged = _merged_rows(cfg, runs)
    moved = sum((k + 1) * header.nbytes for _, k in merged)
    stages.append(
        StageCost(
            f"merge ({len(merged)} rows)",
            0,
            0.0,
            moved / MERGE_BYTES_PER_S / 3600,
            "(K inputs + 1 output) x weight bytes / 0.84 GB/s",
            note="disk-bound, CPU",
        )
    )
    n_rows = 1 + sum(r.kind == "joint" for r in runs) + len(merged) + _controls(cfg, merged)
    stages.append(_eval_stage(cfg, header, sizes, n_rows, tp))
    diag = _diagnose_stage(cfg, header, sizes, runs, tp)
    if diag is not None:
        stages.append(diag)
    options = memory_options(cfg, header, device, gpus, _shape(sizes))
    total, images = sizes.total("train_tokens"), sizes.total("image_tokens")
    return RunPlan(
        config=cfg,
        header=header,
        sizes=sizes,
        throughput=tp,
        runs=tuple(runs),
        stages=tuple(stages),
        memory=tuple(options),
        disk=tuple(disk_items(cfg, header, runs, merged, n_src, gpus, _controls(cfg, merged))),
        recommendation=tuple(recommend(options, gpu_memory, cfg, header, device, _shape(sizes))),
        gpu_memory=gpu_memory,
        gpus=gpus,
        branch_hours=tuple(
            _flops_6n(header, r.epochs * total / r.branches, r.epochs * images / r.branches, merge)
            / tp.flops_per_s
            / 3600
            / cfg.train.procs_per_branch
            for r in runs
        ),
    )
