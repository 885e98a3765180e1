"""Checks of a run config against the registries and the machine, before any work.

Input: a `RunConfig` (its types and ranges were checked when it was built). Output: nothing, or
one ValueError with a line per problem: its key path and, for a choice, the valid choices.
`config.py` stays free of torch; the registries named here (merge methods, partition methods,
splits, launchers, schedulers, dtypes) live in modules that import it.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib.util
import logging
import math
from collections.abc import Iterable
from pathlib import Path

from merit_lab.config.fields import lm_eval_problems
from merit_lab.config.schema import RunConfig
from merit_lab.data.corpora import CORPORA
from merit_lab.data.mixture import SPLITS, MixtureError, count_sources, load_mixture
from merit_lab.evaluation.heldout import load_heldout
from merit_lab.evaluation.lmms_eval import lmms_eval_task_problems
from merit_lab.io import read_json
from merit_lab.merging.methods import MERGE_METHODS
from merit_lab.models.checkpoints import INDEX_NAME, Checkpoint
from merit_lab.models.loading import DTYPES, HUB_ID
from merit_lab.partition.methods import PARTITION_METHODS
from merit_lab.training.launch import MODES
from merit_lab.training.spec import SCHEDULERS

__all__ = ["config_problems", "curvature_memory_problem", "validate_config"]

log = logging.getLogger(__name__)

_CONTROL_KINDS = ("shrink", "early")  # built after the merges: `pipeline.rows.CONTROL_KINDS`
# Any one of these makes a folder's tokenizer loadable by AutoTokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def validate_config(cfg: RunConfig, *, diagnose: bool = True, evaluate: bool = True) -> None:
    """Raise one ValueError listing every problem of ``cfg`` (see `config_problems`)."""
    problems = config_problems(cfg, diagnose=diagnose, evaluate=evaluate)
    if problems:
        raise ValueError("\n".join(f"config {cfg.name!r}: {p}" for p in problems))


def config_problems(cfg: RunConfig, *, diagnose: bool = True, evaluate: bool = True) -> list[str]:
    """Every choice of ``cfg`` that names nothing registered, and what this machine cannot do.

    Each line is ``<key path>: <what is wrong>``; a choice lists the valid ones.

    Args:
        diagnose: check ``diagnostics.experiments`` against the experiments too. Off when the
            diagnose stage does not run: a notebook that overrides the experiments of a config
            to train a smaller table need not restate its diagnostics.
        evaluate: the evaluate stage runs: ``eval.lm_eval`` without lm-eval installed is a
            problem then (when it is installed, its task names are checked either way).
    """
    problems = [
        *_choice("dtype", "dtype", cfg.dtype, ["auto", *DTYPES]),
        *_choice("partition.method", "partition method", cfg.partition.method, PARTITION_METHODS),
        *_choice("train.lr_scheduler", "lr_scheduler", cfg.train.lr_scheduler, SCHEDULERS),
        *_choice("train.launcher", "launcher", cfg.train.launcher, MODES),
        *(
            p
            for i, s in enumerate(cfg.eval.splits)
            for p in _choice(f"eval.splits[{i}]", "split", s, SPLITS)
        ),
        *_experiment_problems(cfg),
        *_control_problems(cfg),
        *_heldout_problems(cfg),
        *_merge_param_problems(cfg.merge.params),
        *_density_problems(cfg),
        *(_diagnostics_problems(cfg) if diagnose else []),
        *_model_problems(cfg.model),
        *_mixture_problems(cfg),
        *_device_problems(cfg),
        *_lm_eval_task_problems(cfg.eval.lm_eval, evaluate),
        *lmms_eval_task_problems(cfg.eval.lmms_eval, evaluate),
    ]
    if cfg.train.launcher == "slurm" and importlib.util.find_spec("submitit") is None:
        problems.append("train.launcher: 'slurm' needs submitit (pip install submitit)")
    model_dir = Path(cfg.model).expanduser()
    if cfg.train.procs_per_branch > 1 and (model_dir / "preprocessor_config.json").is_file():
        problems.append(
            "train.procs_per_branch: image-text models train one process per branch (the null "
            "rows that pad a multi-process step break Qwen2-VL's position ids); set it to 1"
        )
    if cfg.calibration.lora_warmup_steps and not cfg.train.lora_r:
        problems.append(
            "calibration.lora_warmup_steps: a LoRA bank warms up the run's LoRA; set train.lora_r"
        )
    return problems


def _choice(key: str, what: str, value: object, choices: Iterable[str]) -> list[str]:
    """The config.py wording: ``key: unknown <what> 'x'; <what> must be one of: a, b``."""
    choices = list(choices)
    if value in choices:
        return []
    return [f"{key}: unknown {what} {value!r}; {what} must be one of: {', '.join(choices)}"]


def _experiment_problems(cfg: RunConfig) -> list[str]:
    problems = []
    for i, e in enumerate(cfg.experiments):
        key = f"experiments[{i}]"
        if e.method is not None:
            problems += _choice(f"{key}.method", "partition method", e.method, PARTITION_METHODS)
        for j, m in enumerate(e.merges):
            problems += _choice(f"{key}.merges[{j}]", "merge method", m, MERGE_METHODS)
    return problems


def _merged_row_labels(cfg: RunConfig) -> list[str]:
    """The merged rows a control can stand beside (as `pipeline.rows.merged_labels` lists
    them): every split row under every merge method, then every soup."""
    out = []
    for e in cfg.experiments:
        if e.kind == "split":
            out += [e.name if i == 0 else f"{e.name}+{m}" for i, m in enumerate(e.merges)]
    return out + [e.name for e in cfg.experiments if e.kind == "soup"]


def _control_problems(cfg: RunConfig) -> list[str]:
    """A shrink or early control needs a joint experiment to pull back, merged rows to stand
    beside and (early) the joint run's snapshots; other kinds name neither."""
    joints = [e.name for e in cfg.experiments if e.kind == "joint"]
    merged = _merged_row_labels(cfg)
    problems = []
    for i, e in enumerate(cfg.experiments):
        key = f"experiments[{i}]"
        if e.kind not in _CONTROL_KINDS:
            if e.joint is not None or e.of:
                field = "joint" if e.joint is not None else "of"
                problems.append(
                    f"{key}.{field}: only a shrink or early experiment names a joint run and "
                    f"the rows it controls; {e.name!r} is a {e.kind} experiment"
                )
            continue
        if not joints:
            problems.append(
                f"{key}: kind {e.kind} pulls back a joint run, and this config has no joint "
                "experiment; add one (kind: joint)"
            )
        elif e.joint is not None and e.joint not in joints:
            problems.append(
                f"{key}.joint: {e.joint!r} is not a joint experiment of this config; choose "
                f"from: {', '.join(joints)}"
            )
        if not merged:
            problems.append(f"{key}: no split or soup row to control; add a split experiment")
        for j, name in enumerate(e.of):
            if name not in merged:
                problems.append(
                    f"{key}.of[{j}]: {name!r} is not a merged row of this config; choose from: "
                    f"{', '.join(merged) or 'none'}"
                )
        if len(set(e.of)) != len(e.of):
            problems.append(f"{key}.of: a row is listed twice: {list(e.of)}")
        if e.kind == "early" and not cfg.train.snapshot_steps:
            problems.append(
                f"{key}: an early control takes the joint run's weights at the step it reaches "
                "the merge's distance from θ0: set train.snapshot_steps (e.g. [10, 20, 40, 80])"
            )
    return problems


def _heldout_problems(cfg: RunConfig) -> list[str]:
    """``eval.heldout`` loads, and none of its sources is also a training source (counted from
    a local mixture; a `datasets` mixture is checked when the evaluate stage loads it)."""
    if cfg.eval.heldout is None:
        return []
    try:
        held = load_heldout(cfg.eval.heldout)
    except MixtureError as e:
        return [f"eval.heldout: {str(e).removeprefix('eval.heldout: ')}"]
    path = cfg.mixture.path
    if path == "demo":
        from merit_lab.config.paths import DEMO_DIR

        path = str(DEMO_DIR)
    if not Path(path).exists():
        return []
    try:
        m = cfg.mixture
        trained = load_mixture(path, source_column=m.source_column, split=m.split).names
    except (MixtureError, ValueError, KeyError):
        return []  # the mixture stage names what is wrong with it
    clash = sorted(set(held.names) & set(trained))
    if not clash:
        return []
    return [
        f"eval.heldout: {clash} are also sources of the training mixture {cfg.mixture.path}; an "
        "evaluation-only source must be one no row trains (rename it, or leave it out of one)"
    ]


def _merge_param_problems(params: dict) -> list[str]:
    problems = []
    for method, prm in params.items():
        key = f"merge.params.{method}"
        if method not in MERGE_METHODS:
            problems += _choice(key, "merge method", method, MERGE_METHODS)
            continue
        if not isinstance(prm, dict):
            problems.append(f"{key}: expected a mapping of parameters, got {prm!r}")
            continue
        known = MERGE_METHODS[method].defaults
        for name, value in prm.items():
            if name not in known:
                takes = ", ".join(known) or "no parameters"
                problems.append(f"{key}.{name}: unknown parameter; {method} takes: {takes}")
            elif not _finite(value):
                problems.append(f"{key}.{name}: expected a finite number, got {value!r}")
            elif name == "density" and not 0 < float(value) <= 1:
                problems.append(f"{key}.density: must be in (0, 1], got {value!r}")
    return problems


def _density_problems(cfg: RunConfig) -> list[str]:
    """A trim density that keeps no entry of θ0's smallest tensor (ties and dare keep
    ``int(density x numel)`` of each), read from θ0's headers: the merge stage refuses the same
    (`merit_lab.merging.stream`), after training. LoRA branches merge as adapters and do not
    trim; a hub model is checked by the merge stage."""
    used = {m for e in cfg.experiments if e.kind == "split" for m in e.merges}
    densities = {
        m: float(p["density"])
        for m, p in cfg.merge.params.items()
        if m in used and isinstance(p, dict) and _finite(p.get("density"))
    }
    if cfg.train.lora_r or not any(0 < d <= 1 for d in densities.values()):
        return []
    from merit_lab.config.paths import DEMO_DIR

    path = DEMO_DIR / "base" if cfg.model == "demo" else Path(cfg.model).expanduser()
    try:
        tensors = Checkpoint.open(path).tensors if path.is_dir() else {}
    except ValueError:
        return []  # the model's own check names what is wrong with the folder
    if not tensors:
        return []
    key, n = min(((k, math.prod(t[2])) for k, t in tensors.items()), key=lambda kn: kn[1])
    return [
        f"merge.params.{m}.density: {d} keeps no entry of θ0's smallest tensor {key!r} "
        f"({n} entries: int(density x {n}) = 0); use density >= {1 / n:.3g}"
        for m, d in densities.items()
        if 0 < d <= 1 and int(d * n) < 1
    ]


def _finite(value: object) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _diagnostics_problems(cfg: RunConfig) -> list[str]:
    """Diagnostics compare a split experiment's linear merge with its joint run."""
    valid = [e.name for e in cfg.experiments if e.kind == "split" and "linear" in e.merges]
    problems = []
    for i, name in enumerate(cfg.diagnostics.experiments):
        if name not in valid:
            choices = ", ".join(valid) or "none in this config"
            problems.append(
                f"diagnostics.experiments[{i}]: {name!r} is not a split experiment of this config "
                f"with a linear merge; choose from: {choices}"
            )
    return problems


def _model_problems(model: str) -> list[str]:
    """A local folder must hold a Hugging Face model; a hub id is left to the hub."""
    if model == "demo":
        return []
    path = Path(model).expanduser()
    if path.is_dir():
        return [f"model: {model!r}{p}" for p in _folder_problems(path)[:1]]
    if path.exists():
        return [f"model: {model!r} is a file; give a Hugging Face model folder or a hub id"]
    if HUB_ID.fullmatch(model):
        return []
    return [
        f'model: {model!r}: no such folder, and not a hub id (org/name); use "demo", a '
        "Hugging Face model folder or a hub id"
    ]


def _folder_problems(path: Path) -> list[str]:
    """What keeps a local folder from loading as a model: config, weights (headers only, so a
    corrupt or cut file is met now, not after the CPU stages), tokenizer. Each starts with the
    text that follows ``model: 'path'``."""
    if not (path / "config.json").is_file():
        return [
            " is a folder without config.json (not a Hugging Face model); save the model there "
            "with save_pretrained"
        ]
    try:
        read_json(path / "config.json")
    except ValueError as e:
        return [f": {e}"]
    if not any(path.glob("*.safetensors")) and not (path / INDEX_NAME).is_file():
        return [
            ": no .safetensors weights; merit-lab loads safetensors only (convert pickled .bin "
            "weights with save_pretrained(safe_serialization=True))"
        ]
    try:
        Checkpoint.open(path)
    except ValueError as e:
        return [f": {e}"]
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return [
            f": no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the tokenizer there "
            "too (tokenizer.save_pretrained)"
        ]
    return []


def _mixture_problems(cfg: RunConfig) -> list[str]:
    """A mixture path that names nothing, and K groups of fewer than K sources (counted from
    the file names of a local folder, before any stage reads them)."""
    path, hashes = cfg.mixture.path, cfg.mixture.overlap_hashes
    if hashes is not None and not Path(hashes).expanduser().is_file():
        return [
            f"mixture.overlap_hashes: {hashes!r}: no such file; build it with "
            "merit_lab.data.checks.write_hash_list"
        ]
    if not Path(path).exists() and Path(path).name in CORPORA:  # e.g. data/chatterbot
        name = Path(path).name
        return [
            f"mixture.path: {path!r} does not exist yet: run `merit-lab fetch-data {name} "
            f"--out {path}` ("
            + ("one wheel from the package index" if name == "chatterbot" else "from the hub")
            + ")"
        ]
    if path != "demo" and not Path(path).exists() and not HUB_ID.fullmatch(path):
        return [f"mixture.path: {path!r}: no such folder or file, and not a `datasets` hub name"]
    if path == "demo":
        from merit_lab.config.paths import DEMO_DIR

        path = str(DEMO_DIR)
    n = count_sources(path)
    if not n:  # not countable from names, or no sources (the mixture stage says so)
        return []
    splits = [("partition", cfg.partition.r, cfg.partition.k)] + [
        (f"experiments[{i}]", e.r, e.k)
        for i, e in enumerate(cfg.experiments)
        if e.kind == "split" and e.method is not None  # None: the run's partition
    ]
    problems = []
    for key, r, k in splits:
        groups = k if k is not None else 2 ** (r or 0)
        where = f"the mixture {path} has {n} sources"
        if groups > n and k is not None:
            problems.append(f"{key}.k: K = {k} groups but {where}; use k <= {n}")
        elif groups > n:
            problems.append(
                f"{key}.r: {r} gives K = {groups} groups but {where}; use r <= "
                f"{n.bit_length() - 1} (or k <= {n})"
            )
    return problems


def _device_problems(cfg: RunConfig) -> list[str]:
    """A CUDA device that this machine lacks fails now, not after the CPU stages; so does FSDP
    on branches that train on this machine's CPU (accelerate shards on GPUs only)."""
    t = cfg.train
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and t.launcher != "slurm")
    if t.distributed == "fsdp" and t.procs_per_branch > 1 and on_cpu:
        import torch

        if cfg.device == "cpu" or not torch.cuda.is_available():
            return [
                "train.distributed: fsdp needs GPUs (accelerate does not shard on the CPU, and "
                "branches here train on it); use distributed: ddp, or a CUDA device"
            ]
    wants_gpus = cfg.train.launcher == "local" and cfg.train.gpus
    if not cfg.device.startswith("cuda") and not wants_gpus:
        return []
    import torch

    if not torch.cuda.is_available():
        if cfg.device.startswith("cuda"):
            return [
                f"device: {cfg.device!r} but torch.cuda.is_available() is False; use auto or cpu"
            ]
        return [
            f"train.gpus: {list(cfg.train.gpus)} but torch.cuda.is_available() is False; "
            "leave gpus empty"
        ]
    count = torch.cuda.device_count()
    problems = []
    if cfg.device.startswith("cuda:") and int(cfg.device[5:]) >= count:
        problems.append(
            f"device: {cfg.device!r} but this machine has {count} CUDA device(s): "
            f"cuda:0 to cuda:{count - 1}"
        )
    if wants_gpus and any(g >= count for g in cfg.train.gpus):
        problems.append(
            f"train.gpus: {list(cfg.train.gpus)} but this machine has {count} CUDA "
            f"device(s): ids 0 to {count - 1}"
        )
    return problems


def _lm_eval_task_problems(options: dict | None, evaluate: bool) -> list[str]:
    """``eval.lm_eval``'s ``include_path`` and task names, resolved as the evaluate stage resolves
    them (`merit_lab.evaluation.lm_eval.run_lm_eval`): lm-eval's TaskManager over the folder
    alone when one is given, else over its built-in tasks. Without lm-eval installed the names
    cannot be resolved: the run is refused when the evaluate stage is to run (it would fail after
    training), and a warning says what was not checked when it is not."""
    if not options or lm_eval_problems(options):
        return []  # absent, or malformed: `EvalConfig` names what is wrong with its shape
    include = options.get("include_path")
    if include is not None and not Path(include).expanduser().is_dir():
        return [f"eval.lm_eval.include_path: {include!r} is not a folder (of lm-eval task YAMLs)"]
    if importlib.util.find_spec("lm_eval") is None:
        if evaluate:
            return [
                "eval.lm_eval: lm-eval is not installed, and the evaluate stage runs its tasks "
                "after training; pip install 'lm-eval>=0.4' (or remove eval.lm_eval)"
            ]
        log.warning(
            "eval.lm_eval: lm-eval is not installed; its task names %s are not checked (the "
            "evaluate stage, which needs it, does not run now)",
            list(options["tasks"]),
        )
        return []
    known = _lm_eval_tasks(str(Path(include).expanduser()) if include else None)
    problems = []
    for i, task in enumerate(options["tasks"]):
        if task in known:
            continue
        close = difflib.get_close_matches(task, sorted(known), n=3)
        hint = f"; did you mean: {', '.join(close)}" if close else ""
        where = f"in {include}" if include else "among its built-in tasks"
        problems.append(f"eval.lm_eval.tasks[{i}]: lm-eval has no task {task!r} {where}{hint}")
    return problems


@functools.lru_cache(maxsize=8)
def _lm_eval_tasks(include: str | None) -> frozenset[str]:
    """Every task, group and tag name lm-eval's TaskManager indexes (the built-in index takes
    ~5 s: once per process)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include, include_defaults=include is None)
    return frozenset(manager.all_tasks)


def curvature_memory_problem(cfg: RunConfig, model_dir: str | Path) -> str | None:
    """The Hessian's Lanczos basis keeps ``hessian_iter`` float64 vectors of every parameter in
    ``diagnostics.curvature_params``: a basis that cannot fit this machine's available memory
    is refused before any stage runs, not met by the OOM killer after training (SmolLM2-135M
    with every parameter and 20 steps needs 22 GB)."""
    d = cfg.diagnostics
    try:
        layout = Checkpoint.open(model_dir)
    except ValueError:
        return None  # the model's own check names what is wrong with the folder
    keys = [
        k
        for k in layout.float_keys()
        if not d.curvature_params or any(fnmatch.fnmatchcase(k, p) for p in d.curvature_params)
    ]
    dim = sum(math.prod(layout.tensors[k][2]) for k in keys)
    need = 8 * dim * (d.hessian_iter + 4)  # the basis, and a few vectors of the iteration
    free = _available_memory()
    if free is None or need <= 0.75 * free:
        return None
    return (
        f"diagnostics: the Hessian needs about {need / 2**30:.1f} GiB ({d.hessian_iter} Lanczos "
        f"vectors of {dim:,} parameters in float64) and this machine has "
        f"{free / 2**30:.1f} GiB available; name fewer parameters in "
        'diagnostics.curvature_params (e.g. ["model.layers.0.*"]) or lower hessian_iter'
    )


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
