"""LoRA gradient bank, the LESS way: warm a LoRA adapter up on the mixture, then take each
source's gradient on the adapter's parameters only (arXiv:2402.04333, section 4.1).

Input: θ0, the mixture, the run's LoRA settings (``train.lora_*``) and N warm-up steps. Output:
``<folder>/`` holding the warmed-up peft adapter and ``warmup.json`` (its key and losses), and a
model θ0 + adapter whose LoRA A/B matrices are the parameters `estimate_gradients` selects. At the
adapter's start B = 0, so ∂L/∂A = 0: the warm-up makes both factors carry gradient.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from merit_lab.envelope import load_enveloped, save_enveloped
from merit_lab.io import atomic_dir

__all__ = [
    "WARMUP_DIR",
    "WARMUP_RECORD",
    "LoraWarmup",
    "load_lora_model",
    "lora_parameters",
    "read_warmup",
    "warm_up_for_run",
    "warm_up_lora",
    "warmup_info",
]

log = logging.getLogger(__name__)

WARMUP_RECORD = "warmup.json"
WARMUP_DIR = "lora_warmup"  # in a run's gradients/: the warmed-up adapter of a LoRA bank
WARMUP_FORMAT = "merit-lab/lora-warmup"  # warmup.json; files from before the envelope read as v1
WARMUP_VERSION = 1


@dataclass(frozen=True)
class LoraWarmup:
    """The warm-up's settings: the run's LoRA shape and the shared training hyperparameters."""

    steps: int  # optimizer steps (calibration.lora_warmup_steps)
    r: int  # train.lora_r
    alpha: float  # train.lora_alpha
    dropout: float = 0.0  # train.lora_dropout
    target_modules: tuple[str, ...] = ()  # train.lora_target_modules (empty: all linear)
    rslora: bool = False  # train.lora_rslora
    lr: float = 3e-4  # constant AdamW learning rate (train.lr)
    batch_size: int = 32  # examples per step (train.batch_size)
    seed: int = 0  # adapter init and the order of the examples (train.seed)

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.steps < 1 or self.r < 1 or self.batch_size < 1:
            raise ValueError("a LoRA warm-up needs steps >= 1, r >= 1 and batch_size >= 1")

    def key(self, model_fingerprint: str, source_keys: Mapping[str, str], **extra: Any) -> str:
        """A hash of everything the warmed-up adapter depends on."""
        blob = json.dumps(
            [self.__dict__, model_fingerprint, dict(source_keys), extra],
            sort_keys=True,
            default=list,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lora_parameters(model: torch.nn.Module) -> list[tuple[str, Tensor]]:
    """The LoRA A and B matrices of a peft model, in module order: (name, parameter)."""
    found = [(n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    if not found:
        raise ValueError("the model has no LoRA parameters (load it with load_lora_model)")
    return found


def warm_up_lora(
    base: str | Path,
    tokenizer,
    examples: Sequence,
    folder: str | Path,
    settings: LoraWarmup,
    *,
    key: str,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> Path:
    """Train a fresh LoRA adapter on θ0 for ``settings.steps`` seeded AdamW steps, save it.

    Each step is the mean response-token loss of ``batch_size`` examples drawn in a seeded
    order from ``examples`` (every source's train split pooled, so the adapter sees the
    mixture); the learning rate is constant. A folder whose ``warmup.json`` has ``key`` is
    returned as it is.

    Args:
        examples: tokenised examples (`formatting.TokenizedExample`) of the whole mixture.
        folder: where the adapter goes (``adapter_config.json``, ``adapter_model.safetensors``).
        key: `LoraWarmup.key` of this request.

    Returns:
        ``folder``.
    """
    from peft import get_peft_model

    from merit_lab.data.formatting import collate, response_token_loss
    from merit_lab.models.loading import load_model
    from merit_lab.models.lora import make_lora_config

    folder = Path(folder)
    if _stored_key(folder) == key:
        return folder
    if not examples:
        raise ValueError("no train examples to warm the LoRA adapter up on")
    s = settings
    model = load_model(base, device=device, dtype="float32", trust_remote_code=trust_remote_code)
    torch.manual_seed(s.seed)
    cfg = make_lora_config(s.r, s.alpha, s.dropout, s.target_modules, s.rslora)
    model = get_peft_model(model, cfg).train()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=s.lr, weight_decay=0.0
    )
    rng, order = np.random.default_rng(s.seed), np.empty(0, dtype=np.int64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev = next(model.parameters()).device
    losses = []
    for _ in range(s.steps):
        while len(order) < s.batch_size:  # fresh seeded passes over the pooled examples
            order = np.concatenate([order, rng.permutation(len(examples))])
        take, order = order[: s.batch_size], order[s.batch_size :]
        batch = {k: v.to(dev) for k, v in collate([examples[i] for i in take], pad).items()}
        loss = response_token_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    log.info("LoRA warm-up: %d steps, loss %.4f -> %.4f", s.steps, losses[0], losses[-1])
    with atomic_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        record = {"key": key, "settings": s.__dict__, "losses": losses}
        save_enveloped(tmp / WARMUP_RECORD, WARMUP_FORMAT, WARMUP_VERSION, record)
    return folder


def load_lora_model(model: torch.nn.Module, adapter: str | Path) -> torch.nn.Module:
    """θ0 (a loaded model) with the warmed-up adapter attached, in eval mode (no dropout):
    the model whose `lora_parameters` the LoRA bank takes gradients on."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)).eval()


def read_warmup(folder: str | Path) -> dict[str, Any]:
    """``warmup.json`` of an adapter folder: its ``key``, ``settings`` and ``losses`` (another
    format, or a newer version, is refused with `merit_lab.envelope.EnvelopeError`)."""
    return load_enveloped(Path(folder) / WARMUP_RECORD, WARMUP_FORMAT, WARMUP_VERSION, legacy=True)


def _stored_key(folder: Path) -> str | None:
    """The key of the adapter already in ``folder``, or None when there is none."""
    return read_warmup(folder)["key"] if (folder / WARMUP_RECORD).is_file() else None


def warmup_info(folder: str | Path) -> dict[str, Any]:
    """What the bank records of its adapter: the warm-up key and settings, from ``warmup.json``."""
    record = read_warmup(folder)
    return {"warmup_key": record["key"], **record["settings"]}


def warm_up_for_run(
    cfg,
    mixture,
    folder: str | Path,
    model_path: str,
    model_fingerprint: str,
    source_keys: Mapping[str, str],
) -> Path | None:
    """The run's warmed-up adapter (``calibration.lora_warmup_steps`` > 0), else None.

    Args:
        cfg: the `RunConfig`: the LoRA shape and lr/batch/seed from ``train``, the steps from
            ``calibration``; the warm-up trains on every source's train split at
            ``train.max_length``.
        mixture: the run's `Mixture`; source_keys: its sources' content keys (part of the key).
    """
    from merit_lab.data.formatting import tokenize_examples
    from merit_lab.models.loading import load_tokenizer

    steps, t = cfg.calibration.lora_warmup_steps, cfg.train
    if not steps:
        return None
    if not t.lora_r:
        raise ValueError("calibration.lora_warmup_steps needs train.lora_r > 0 (the LoRA shape)")
    settings = LoraWarmup(
        steps,
        t.lora_r,
        t.lora_alpha,
        t.lora_dropout,
        t.lora_target_modules,
        t.lora_rslora,
        t.lr,
        t.batch_size,
        t.seed,
    )
    key = settings.key(
        model_fingerprint,
        source_keys,
        max_length=t.max_length,
        long_examples=cfg.mixture.long_examples,
    )
    if _stored_key(Path(folder)) == key:  # before loading anything
        return Path(folder)
    tok = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    policy, examples = cfg.mixture.long_examples, []
    for name in source_keys:
        examples += tokenize_examples(tok, mixture[name].train, t.max_length, policy)
    return warm_up_lora(
        model_path,
        tok,
        examples,
        folder,
        settings,
        key=key,
        device=cfg.device,
        trust_remote_code=cfg.trust_remote_code,
    )
