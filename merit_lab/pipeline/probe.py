"""A finished run's checkpoints behind one loaded model: what the diagnostics stage measures.

Input: ``runs/<name>`` after the merge stage. Output: `RunProbe`, which loads θ0 once and writes
any checkpoint of the run (θ0, joint rows, merges, branches) into it by label, with the pooled
train and held-out losses, fingerprints and merge weights the diagnostics need.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from merit_lab.diagnostics import (
    LossFn,
    Weights,
    as_weights,
    float_tensors,
    interpolation_curve,
    make_loss_fn,
)
from merit_lab.merging.stream import load_merge_manifest
from merit_lab.models.checkpoints import fingerprint_checkpoint
from merit_lab.models.loading import load_model, load_tokenizer
from merit_lab.pipeline.curation import mixture_names
from merit_lab.pipeline.rows import THETA0, model_rows
from merit_lab.pipeline.rundir import RunDir, load_run_mixture

__all__ = ["SPLITS", "RunProbe", "measure_path", "select_weights"]

SPLITS = ("train", "eval")  # the pooled train examples and the held-out ones


def _assign(model: torch.nn.Module, theta: Weights) -> None:
    """Write every floating-point tensor of ``theta`` into the model in place."""
    src = as_weights(theta)
    target = float_tensors(model)
    with torch.no_grad():
        for k in src:
            if k in target and target[k].is_floating_point():
                target[k].copy_(src[k].to(target[k].device, target[k].dtype))


def select_weights(theta: Weights, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a checkpoint (a folder is read only for those)."""
    src = as_weights(theta)
    return {n: src[n] for n in names}


def measure_path(
    model: torch.nn.Module,
    theta_a: Weights,
    theta_b: Weights,
    loss_fns: Mapping[str, LossFn],
    alphas: Sequence[float] | np.ndarray,
) -> dict[str, dict]:
    """`interpolation_curve` of one linear path under several losses (split name → curve)."""
    return {
        split: interpolation_curve(model, theta_a, theta_b, fn, alphas, progress=False)
        for split, fn in loss_fns.items()
    }


class RunProbe:
    """One loaded model and the loss functions of a run, with every checkpoint by label.

    Labels: ``theta0``, each joint/split row's label, and each branch as ``<experiment>/<k>``.
    The model starts at θ0 and is overwritten in place for each checkpoint (one load per run).

    Args:
        run_dir: ``runs/<name>`` after the merge stage.
        max_examples: per source, the first train and the first held-out examples pooled into
            the ``train`` and ``eval`` losses.
        experiments: split experiments to probe (default: every one with a linear merge).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        max_examples: int = 16,
        experiments: Sequence[str] | None = None,
    ) -> None:
        self.run = RunDir(Path(run_dir))
        self.cfg = self.run.load_config()
        self.max_examples = int(max_examples)
        # the diagnostics probe the config's own training seed; repeats under train.seeds are
        # for the comparison's spread only
        self.rows = [r for r in model_rows(self.cfg) if not r.repeat]
        linear = [r for r in self.rows if r.kind == "split" and r.merge_method == "linear"]
        if experiments is not None:
            unknown = sorted(set(experiments) - {r.experiment for r in linear})
            if unknown:
                raise ValueError(f"no split experiment with a linear merge named {unknown}")
            linear = [r for r in linear if r.experiment in experiments]
        self.merged = linear  # the split rows diagnosed
        self.joints = [r for r in self.rows if r.kind == "joint"]
        self.theta0_dir = self.rows[0].model_dir
        self.checkpoints: dict[str, Path] = {r.label: r.model_dir for r in self.rows}
        self.branches: dict[str, list[str]] = {}  # merged row label → its branch labels
        for r in self.merged:
            labels = [f"{r.experiment}/{k}" for k in range(len(r.inputs))]
            self.checkpoints.update(zip(labels, r.inputs, strict=True))
            self.branches[r.label] = labels
        self.epochs = {e.name: e.epochs for e in self.cfg.experiments}
        # θ0, the joint rows, the diagnosed merges and their branches
        self.probed = [THETA0, *(r.label for r in self.joints), *(r.label for r in self.merged)]
        self.probed += [b for r in self.merged for b in self.branches[r.label]]
        self._model = self._tok = self._loss_fns = self._theta0 = self._mixture = None
        self._losses: dict[str, dict[str, float]] = {}
        self._fps: dict[str, str] = {}

    # -- lazily loaded pieces: a run whose diagnostics are current loads nothing
    @property
    def mixture(self):
        if self._mixture is None:  # the curated mixture: dropped sources are in no loss
            self._mixture = load_run_mixture(self.cfg).select(mixture_names(self.cfg))
        return self._mixture

    @property
    def tokenizer(self):
        if self._tok is None:
            remote = self.cfg.trust_remote_code
            self._tok = load_tokenizer(self.theta0_dir, trust_remote_code=remote)
        return self._tok

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = load_model(
                self.theta0_dir,
                device=self.cfg.device,
                dtype=self.cfg.dtype,
                trust_remote_code=self.cfg.trust_remote_code,
            )
            self._model.requires_grad_(True)
        return self._model

    @property
    def theta0(self) -> Weights:
        """θ0's folder, or (a hub id) its parameters as loaded."""
        if self._theta0 is None:
            local = Path(self.theta0_dir).is_dir()
            self._theta0 = Path(self.theta0_dir) if local else _load_params(self.model)
        return self._theta0

    def weights(self, label: str) -> Weights:
        return self.theta0 if label == THETA0 else self.checkpoints[label]

    def examples(self, split: str, n: int | None = None) -> list[dict]:
        """The first ``n`` (default max_examples) examples of every source's ``split``, pooled."""
        n = self.max_examples if n is None else n
        return [ex for s in self.mixture for ex in s.split(split)[:n]]

    @property
    def loss_fns(self) -> dict[str, LossFn]:
        if self._loss_fns is None:
            kw = {"max_length": self.cfg.train.max_length, "batch_size": self.cfg.eval.batch_size}
            self._loss_fns = {
                s: make_loss_fn(self.tokenizer, self.examples(s), **kw) for s in SPLITS
            }
        return self._loss_fns

    def fingerprint(self, label: str) -> str:
        if label not in self._fps:
            folder = self.checkpoints[label]
            local = any(Path(folder).glob("*.safetensors"))
            self._fps[label] = fingerprint_checkpoint(folder) if local else str(folder)
        return self._fps[label]

    def fingerprints(self, labels: Sequence[str]) -> dict[str, str]:
        return {label: self.fingerprint(label) for label in labels}

    def load(self, label: str) -> torch.nn.Module:
        """The model with ``label``'s weights written in."""
        _assign(self.model, self.weights(label))
        return self.model

    def losses(self, label: str) -> dict[str, float]:
        """Pooled train and held-out loss of one checkpoint (cached)."""
        if label not in self._losses:
            model = self.load(label)
            self._losses[label] = {s: float(fn(model)) for s, fn in self.loss_fns.items()}
        return self._losses[label]

    def path(self, a: str, b: str, alphas: Sequence[float] | np.ndarray) -> dict[str, dict]:
        """Loss along (1−α)θ_a + αθ_b on both splits (see `measure_path`)."""
        self.load(a)
        return measure_path(self.model, self.weights(a), self.weights(b), self.loss_fns, alphas)

    def merge_weights(self, label: str) -> list[float]:
        return list(load_merge_manifest(self.checkpoints[label])["weights"])

    def reference_joint(self):
        """The joint row merges are compared with: the first 1-epoch one, else the first."""
        ones = [r for r in self.joints if self.epochs.get(r.experiment) == 1]
        return (ones or self.joints or [None])[0]


def _load_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").clone() for n, p in model.named_parameters()}
