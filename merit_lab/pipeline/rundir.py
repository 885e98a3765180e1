"""The run directory: every path of ``runs/<name>/``, every stored stage key, and the readers.

The bottom of `merit_lab.pipeline`: it imports only the library. Every other pipeline module asks
`RunDir` where an artifact lives and whether it is current (`RunDir.is_current`), so the layout
is written down once (docs/architecture.md, "The run directory").
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shlex
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.config.locate import locate_outside_paths
from merit_lab.config.schema import RunConfig, load_config
from merit_lab.data.mixture import Mixture, load_mixture
from merit_lab.gradients.bank import GradientBank
from merit_lab.io import (
    LockHeldError,
    entry_size,
    find_temp,
    hold_lock,
    read_json,
    remove_temp,
    temp_leftovers_of,
)
from merit_lab.jobs import LEASE_DIR, job_leases, wait_for_leases
from merit_lab.partition.plan import Partition
from merit_lab.partition.session import DROPPED, UNPLACED

__all__ = [
    "DROPPED",
    "SIZE_UNIT",
    "THROUGHPUT_KEY",
    "UNPLACED",
    "RunDir",
    "load_run_mixture",
    "load_source_table",
    "mixture_args",
    "run_config",
    "source_counts",
    "writes_run",
]

# The one size unit of a run: the split balances it, the merge weights and the curation's counts
# are in it. Response tokens: the tokens the training loss averages over.
SIZE_UNIT = "response_tokens"
THROUGHPUT_KEY = "tokens_per_s"  # in timings.json beside the seconds: {stage: rates}


@dataclass(frozen=True)
class RunDir:
    """Paths of one run's artifacts, the stage keys stored in them and their readers."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ------------------------------------------------------------------ top-level artifacts
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def mixture(self) -> Path:
        return self.root / "mixture.json"

    @property
    def gradients(self) -> Path:
        return self.root / "gradients"

    @property
    def bank_json(self) -> Path:
        return self.gradients / "bank.json"

    @property
    def layer_json(self) -> Path:
        """Layer-group rows' names, groups and key (``layers.safetensors`` beside it)."""
        return self.gradients / "layers.json"

    @property
    def layer_parts(self) -> Path:
        return self.gradients / "layers_parts"

    @property
    def drift(self) -> Path:
        """Conflict drift (`merit-lab drift`): ``drift.json``, the banks, the mid checkpoint."""
        return self.root / "drift"

    @property
    def conflict(self) -> Path:
        """The conflict space: names, order, variance and the arrays' sha256 (written last)."""
        return self.root / "conflict.json"

    @property
    def conflict_arrays(self) -> Path:
        """The conflict space's (T, T) cosines and (T, R) embedding (conflict.json names it)."""
        return self.root / "conflict.safetensors"

    @property
    def partition(self) -> Path:
        return self.root / "partition.json"

    @property
    def train_json(self) -> Path:
        return self.root / "train.json"

    @property
    def merge_json(self) -> Path:
        return self.root / "merge.json"

    @property
    def eval(self) -> Path:
        return self.root / "eval.parquet"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def diagnostics(self) -> Path:
        return self.root / "diagnostics"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    @property
    def lock(self) -> Path:
        """``.lock``: the one writer's pid, host, start time and command, while it runs."""
        return self.root / ".lock"

    @contextlib.contextmanager
    def writer_lock(self, command: str | None = None) -> Iterator[RunDir]:
        """Be the run's one writer for the block (`merit_lab.io.hold_lock` on `lock`).

        Raises:
            LockHeldError: another live process writes this run (the message names it).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with hold_lock(self.lock, command=command):
            # jobs a killed runner launched finish their unit first: never swept or relaunched
            wait_for_leases(self.root / LEASE_DIR)
            with job_leases(self.root / LEASE_DIR):  # the jobs launched now hold leases
                yield self

    # ------------------------------------------------------------------------- temp entries
    def stage_outputs(self, stage: str) -> list[Path]:
        """What ``stage`` writes (files and folders): where its killed writes leave temp entries."""
        return {
            "mixture": [self.mixture],
            "gradients": [self.gradients],
            "conflict": [
                self.conflict_arrays,
                self.conflict,
                self.root / "fold_stability.safetensors",  # the fold stability, written after
                self.root / "fold_stability.json",
            ],
            "partition": [self.partition],
            "train": [self.root / "branches", self.root / "joint", self.train_json],
            "merge": [self.root / "merged", self.root / "controls", self.merge_json],
            "evaluate": [self.eval_dir, self.eval],
            "diagnose": [self.diagnostics],
            "report": [self.report, self.results, self.figures],
        }[stage]

    def sweep_temp(self, stages: Iterable[str]) -> list[Path]:
        """Remove the temp entries that killed writes of ``stages`` left (and of the runner's
        own ``config.yaml``, ``launch.json``, ``timings.json``), before those stages start;
        returns them.

        Only the holder of ``.lock`` may: every writer of a run holds it or is a child it
        launches after the sweep (branch training, gradient workers), so no temp entry of a
        live write is removed. Per stage, not the whole run: a folder some other tool writes
        without the lock (``merit-lab figures --out``, a notebook) is left alone unless a stage
        that is about to rewrite it runs.

        Raises:
            LockHeldError: this process does not hold ``.lock``.
        """
        holder = read_json(self.lock) if self.lock.is_file() else {}
        if (holder.get("pid"), holder.get("host")) != (os.getpid(), socket.gethostname()):
            raise LockHeldError(
                f"{self.root}: only the writer holding {self.lock} removes its temp entries "
                f"(held by {holder.get('pid', 'nobody')}); take it with RunDir.writer_lock()"
            )
        found: set[Path] = set()
        outputs = [p for s in stages for p in self.stage_outputs(s)]
        for path in [self.config, self.launch, self.timings, *outputs]:
            found.update(temp_leftovers_of(path))
            if path.is_dir():
                found.update(find_temp(path))
        return remove_temp(sorted(found))

    def temp_entries(self) -> list[tuple[Path, int]]:
        """Every temp entry under the run with its size in bytes: leftovers of killed writes,
        or writes in progress while a writer holds ``.lock``."""
        return [(p, entry_size(p)) for p in find_temp(self.root)]

    @property
    def convergence(self) -> Path:
        """A run's gradient-convergence table (written by notebook 04)."""
        return self.root / "convergence.parquet"

    @property
    def example_sketches(self) -> Path:
        """Per-example gradients of the calibration examples (``merit-lab examples``)."""
        return self.root / "examples.safetensors"

    @property
    def example_table(self) -> Path:
        """One row per calibration example: coordinates, outlier flag (``merit-lab examples``)."""
        return self.root / "examples.parquet"

    @property
    def stability(self) -> Path:
        """The bootstrap stability of the split (``merit-lab examples``)."""
        return self.root / "stability.json"

    # --------------------------------------------------------------------- nested artifacts
    def experiment_dir(self, experiment: str) -> Path:
        return self.root / "branches" / experiment

    def experiment_partition(self, experiment: str) -> Path:
        """The grouping a split experiment trains."""
        return self.experiment_dir(experiment) / "partition.json"

    def branch_dir(self, experiment: str, k: int) -> Path:
        return self.experiment_dir(experiment) / str(k)

    def joint_dir(self, epochs: float, seed: int) -> Path:
        """A joint run (shared by joint rows and soups: a soup's seed-0 member is joint-1ep)."""
        return self.root / "joint" / f"ep{epochs:g}-s{seed}"

    def merged_dir(self, label: str) -> Path:
        return self.root / "merged" / label

    def eval_cache(self, label: str) -> Path:
        return self.eval_dir / f"{label.replace('/', '_')}.parquet"

    def diagnostic(self, name: str) -> Path:
        return self.diagnostics / f"{name}.json"

    @property
    def curvature_tensors(self) -> Path:
        return self.diagnostics / "curvature.safetensors"

    def training_logs(self) -> list[Path]:
        """Every joint run's and branch's ``log.jsonl``: joint runs first, then branches."""
        return sorted(self.root.glob("joint/*/log.jsonl")) + sorted(
            self.root.glob("branches/*/*/log.jsonl")
        )

    # ------------------------------------------------------------------------- stage keys
    def artifact(self, stage: str) -> Path:
        """The file whose presence marks ``stage`` as done."""
        return {
            "mixture": self.mixture,
            "gradients": self.bank_json,
            "conflict": self.conflict,
            "partition": self.partition,
            "train": self.train_json,
            "merge": self.merge_json,
            "evaluate": self.eval,
            "diagnose": self.diagnostic("gain"),
            "report": self.report,
        }[stage]

    def stored_key(self, stage: str, item: str | None = None) -> str | None:
        """The key of the inputs an artifact was made from (None: absent or keyless).

        Stages: mixture keeps it as ``key``, conflict the bank's as ``bank_key``, gradients
        as ``info.stage_key``, partition as ``params.stage_key``. Per-item artifacts, ``item``
        naming one: ``"merged"`` (a row's ``merge_manifest.json``: ``merit_key``), ``"eval"``
        (a row's cached table: its ``key`` column), ``"diagnostic"``
        (``diagnostics/<name>.json``: ``key``), ``"curvature"`` (the safetensors metadata).
        """
        if stage == "eval":
            path = self.eval_cache(item)
            if not path.is_file():
                return None
            keys = pd.read_parquet(path, columns=["key"])["key"].unique()
            return str(keys[0]) if len(keys) == 1 else None
        if stage == "curvature":
            return _safetensors_key(self.curvature_tensors)
        if stage == "merged":
            path, field = self.merged_dir(item) / "merge_manifest.json", "merit_key"
        elif stage == "diagnostic":
            path, field = self.diagnostic(item), "key"
        elif stage == "conflict":  # made from the bank with that key
            path, field = self.conflict, "bank_key"
        else:
            path, field = self.artifact(stage), "key"
        if not path.is_file() or path.suffix != ".json":
            return None
        data = read_json(path)
        if stage in ("gradients", "partition"):
            return data.get("info" if stage == "gradients" else "params", {}).get("stage_key")
        return data.get(field)

    def is_current(self, stage: str, key: str, item: str | None = None) -> bool:
        """Whether an artifact exists and was made from inputs with this key."""
        return self.stored_key(stage, item) == key

    @property
    def launch(self) -> Path:
        """``launch.json``: the folder the run's config was last run from and its outside paths
        as they resolved then (`launch_record`), written beside ``config.yaml``."""
        return self.root / "launch.json"

    # ----------------------------------------------------------------------------- readers
    def load_config(self) -> RunConfig:
        """``config.yaml``, located here: its ``run_dir`` is this folder (absolute), whatever
        ``output_dir`` and ``name`` it stores (where the run was made), and its outside paths
        resolved once (`locate_outside_paths`). Every reader of a run takes its config from here,
        so every path inside the run comes from this folder, from any working directory.

        Raises:
            FileNotFoundError: no ``config.yaml`` here, or an outside path (θ0, the mixture)
                that no longer exists: the message names the key.
        """
        if not self.config.is_file():
            raise FileNotFoundError(f"{self.root}: not a run directory (no config.yaml)")
        root = Path(os.path.abspath(self.root))
        cfg = load_config(self.config, output_dir=str(root.parent), name=root.name)
        launch = read_json(self.launch) if self.launch.is_file() else {}
        return locate_outside_paths(cfg, launch, where=self.config)

    def config_as_given(self) -> RunConfig:
        """``config.yaml`` as it was run, for showing θ0 and the mixture as they were named: its
        ``output_dir``, ``name`` and relative paths are not this folder's (`load_config` is)."""
        return load_config(self.config)

    def read_mixture(self) -> dict[str, Any]:
        """``mixture.json``: sources with counts, calibration ids and metadata."""
        try:
            return read_json(self.mixture)
        except ValueError as e:  # the error names the path and line
            raise ValueError(f"{e}; delete it and run the mixture stage again") from e

    def source_names(self) -> list[str]:
        """Every source of ``mixture.json`` (the original mixture, before curation)."""
        return [s["name"] for s in self.read_mixture()["sources"]]

    def load_space(self):
        return ConflictSpace.load(self.conflict)

    def load_partition(self, experiment: str | None = None):
        """The run's ``partition.json`` (or a split experiment's own).

        Raises:
            ValueError: it names a source that ``mixture.json`` does not have (a typo in a hand
                edit, a source renamed since): the message says which and what to do.
        """
        path = self.partition if experiment is None else self.experiment_partition(experiment)
        part = Partition.load(path)
        if self.mixture.is_file():
            unknown = sorted(set(part.sources) - set(self.source_names()))
            if unknown:
                raise ValueError(
                    f"{path}: sources not in mixture.json: {unknown}; fix the names in "
                    f"{path.name} (or delete it: the partition stage writes a new one)"
                )
        return part

    def load_bank(self, *, mmap: bool = False):
        """The gradient bank; ``mmap=True`` maps its rows read-only (see `GradientBank.load`)."""
        return GradientBank.load(self.gradients, mmap=mmap)

    def example_tokens(self) -> dict[str, list[int]]:
        """Per source, the size (`SIZE_UNIT`: response tokens) of each train example: what a
        down-weighted subset sums."""
        return {
            s["name"]: list(s.get("train_example_response_tokens", ()))
            for s in self.read_mixture()["sources"]
        }


def writes_run(fn: Callable) -> Callable:
    """Make a pipeline function whose first argument is a run config or a run directory write
    as the run's one writer (`RunDir.writer_lock`): called from a notebook while `merit-lab run`
    writes the run, it is refused with `LockHeldError` naming that process (and a CLI run is
    refused while it writes). Inside `run_pipeline`, which holds the lock, it is entered again."""

    @functools.wraps(fn)
    def locked(target, *args, **kwargs):
        run = RunDir(
            target.run_dir
            if isinstance(target, RunConfig)
            else target.root
            if isinstance(target, RunDir)
            else Path(target)
        )
        if not run.root.is_dir():  # nothing to protect yet (and no folder made for a typo)
            return fn(target, *args, **kwargs)
        with run.writer_lock(command=f"{fn.__name__}() in {shlex.join(sys.argv)}"):
            return fn(target, *args, **kwargs)

    return locked


def run_config(target: RunConfig | RunDir | str | Path) -> RunConfig:
    """The config a stage works on: a config as given (its run: ``<output_dir>/<name>``), or
    the config of a run folder (a `RunDir` or its path), located there (`RunDir.load_config`)."""
    if isinstance(target, RunConfig):
        return target
    return (target if isinstance(target, RunDir) else RunDir(Path(target))).load_config()


def mixture_args(cfg: RunConfig) -> dict:
    """`load_mixture`'s arguments for a run (``path`` included): every stage and every branch
    spec loads the mixture with exactly these, so all see the same splits."""
    m = cfg.mixture
    return {
        "path": m.path,
        "source_column": m.source_column,
        "calibration_n": cfg.calibration.n,
        "eval_fraction": m.eval_fraction,
        "seed": cfg.seed,
        "split": m.split,
    }


def load_run_mixture(cfg: RunConfig) -> Mixture:
    """The mixture a run config names, split as the run splits it."""
    args = mixture_args(cfg)
    return load_mixture(args.pop("path"), **args)


def source_counts(run: RunDir) -> tuple[dict[str, int], dict[str, int]]:
    """Per-source train examples and train sizes in `SIZE_UNIT`, from ``mixture.json``.

    The size is what the split balances and what sets the merge weights; it is the response
    tokens, the tokens the loss averages over, so a group's merge weight is its share of the
    joint run's loss (the branches record the same count, ``response_tokens``, in
    ``merit_branch.json``, and the merge reads it from there)."""
    sources = run.read_mixture()["sources"]
    if any("train_response_tokens" not in s for s in sources):
        raise KeyError(
            f"{run.mixture} predates the response-token size unit: run the mixture stage again "
            "(`merit-lab run <config>` redoes it and what depends on it)"
        )
    return (
        {s["name"]: s["n_train"] for s in sources},
        {s["name"]: s["train_response_tokens"] for s in sources},
    )


_SCALAR = (str, int, float, bool, type(None))


def load_source_table(run_dir: str | Path) -> pd.DataFrame:
    """One row per source of ``mixture.json`` (indexed by name): counts, metadata, θ0 loss and
    gradient norm, and the curation.

    ``tokens`` is the source's size in the run's `SIZE_UNIT` (train response tokens: what the
    split balances and the merge weights count); ``input_tokens`` counts every input token.

    ``group`` is ``G<k>`` for a source of the partition, ``dropped`` for one a hand edit removed,
    ``unplaced`` for one added to the mixture after the partition was made; ``fraction`` is the
    share of its train examples the rows train (1 unless down-weighted). Columns appear as their
    artifacts exist, so it works on a partly finished run.
    """
    run = RunDir(Path(run_dir))
    rows = []
    for s in run.read_mixture()["sources"]:
        meta = {k: v for k, v in s["metadata"].items() if isinstance(v, _SCALAR)}
        rows.append(
            {
                "source": s["name"],
                **meta,
                "examples": s["n_train"],
                # SIZE_UNIT: what splits and weights use (a run's mixture.json from before the
                # unit has only its input tokens: shown as they are until the run is redone)
                "tokens": s.get("train_response_tokens", s["train_tokens"]),
                "input_tokens": s["train_tokens"],
            }
        )
    table = pd.DataFrame(rows).set_index("source", drop=False)
    if run.bank_json.exists():
        stats = read_json(run.bank_json)["stats"]
        table["loss_theta0"] = [stats.get(n, {}).get("loss") for n in table.index]
        table["grad_norm"] = [stats.get(n, {}).get("grad_norm") for n in table.index]
    if run.partition.exists():
        part = run.load_partition()
        kept = set(part.sources)
        table["group"] = [
            f"G{part.group_of(n)}" if n in kept else DROPPED if n in part.dropped else UNPLACED
            for n in table.index
        ]
        table["fraction"] = [float(part.fractions.get(n, 1.0)) for n in table.index]
    return table


def safe_stem(label: str) -> str:
    """A file stem for a row label (``merit-2d+ties`` → ``merit-2d_ties``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", label)


def _safetensors_key(path: Path) -> str | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("key")
