"""Demo base model θ0: a character-level tokenizer with a chat template and a tiny Llama.

``pretrain_demo_base`` trains the Llama on a separately seeded draw from every demo source so it
knows the task families but hedges between the planted conflicting variants, then saves it
(safetensors) with its tokenizer as a Hugging Face folder, by default ``data/demo/base/``.
"""

from __future__ import annotations

import math
import random
import string
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from merit_lab.demo.tasks import demo_sources, sample_demo_example
from merit_lab.io import atomic_dir, atomic_write_json

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "build_demo_tokenizer",
    "demo_model_config",
    "pretrain_demo_base",
    "train_from_batches",
]

PAD, BOS, END, UNK, USER, ASSISTANT, SYSTEM = (
    "<pad>",
    "<bos>",
    "<|end|>",
    "<unk>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
)
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, END, UNK, USER, ASSISTANT, SYSTEM)

# Each turn is `<|role|>content<|end|>`; the generation prompt is exactly the opening of an
# assistant turn, so rendering messages[:i] with add_generation_prompt=True is a string (and,
# with one token per character, a token) prefix of rendering messages[:i+1]. The assistant's
# `<|end|>` belongs to the response, so the model learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_demo_tokenizer(chars: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Build the demo's character-level tokenizer (one token per character) with a chat template.

    Args:
        chars: Characters of the vocabulary; default printable ASCII without tabs and form
            feeds, which covers the demo corpus. Anything else maps to ``<unk>``.

    Returns:
        A ``PreTrainedTokenizerFast`` with pad/bos/eos/unk set; eos is the end-of-turn token.
    """
    if chars is None:
        chars = string.digits + string.ascii_letters + string.punctuation + " \n"
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in sorted(set(chars)):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # `[\s\S]` rather than `.` so that newlines are characters too.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        model_max_length=256,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def demo_model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The tiny Llama of the demo (~0.6M parameters) for ``tokenizer``'s vocabulary."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _encode_batch(
    tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[str, str]]
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` with the prompt masked (-100)."""
    from merit_lab.data.formatting import collate, tokenize_example

    examples = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
        for p, r in pairs
    ]
    return collate([tokenize_example(tokenizer, ex) for ex in examples], tokenizer.pad_token_id)


def train_from_batches(
    model: torch.nn.Module,
    next_batch: Callable[[], dict[str, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    warmup: int,
    desc: str,
) -> tuple[float, float]:
    """The demo bases' training loop: AdamW (betas 0.9/0.95, weight decay 0.01), linear warmup
    then cosine decay to 10% of ``lr``, gradient clipping at 1, one ``next_batch()`` per step.

    Returns:
        (the loss's exponential moving average at the end, wall seconds).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start, ema = time.perf_counter(), None
    model.train()
    for _ in (bar := tqdm(range(steps), desc=desc)):
        loss = model(**next_batch()).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
    model.eval()
    return float(ema), time.perf_counter() - start


def pretrain_demo_base(
    mixture_dir: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 3e-3,
    warmup: int = 100,
    case_noise: float = 0.15,
    overwrite: bool = True,
) -> Path:
    """Pretrain the demo base model θ0 and save it with its tokenizer as an HF folder.

    The training draw comes from a generator seeded apart from the mixture files, with every
    source equally likely, so θ0 learns each family's task and both formats of each planted
    axis equally: at the first token of an answer it hedges between the conflicting variants.
    Only response tokens are trained (θ0 plays an instruction-tuned model, as in the paper).

    Args:
        mixture_dir: The demo mixture folder; its ``sources.json`` is recorded, not trained on.
        out_dir: Destination folder (``data/demo/base``), written atomically.
        seed: Seed of the initialisation and of the training draw.
        steps: Optimiser steps.
        batch_size: Examples per step.
        lr: Peak AdamW learning rate (linear warmup, cosine decay to 10%).
        warmup: Warmup steps.
        overwrite: Replace an existing ``out_dir``.

    Returns:
        ``out_dir``.
    """
    torch.manual_seed(seed)
    tokenizer = build_demo_tokenizer()
    model = LlamaForCausalLM(demo_model_config(tokenizer))
    model.train()
    sources = demo_sources()
    rng = random.Random(f"merit-lab-demo-pretrain:{seed}")

    def next_batch() -> dict[str, torch.Tensor]:
        pairs = [
            sample_demo_example(rng.choice(sources), rng, case_noise=case_noise)
            for _ in range(batch_size)
        ]
        return _encode_batch(tokenizer, pairs)

    ema, seconds = train_from_batches(
        model, next_batch, steps=steps, lr=lr, warmup=warmup, desc="pretrain demo base"
    )
    model.eval()
    info = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "case_noise": case_noise,
        "final_loss_ema": ema,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "wall_seconds": round(seconds, 1),
        "mixture": str(Path(mixture_dir).name),
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        # transformers >= 5 writes safetensors only (`model.safetensors`).
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "pretrain.json", info)
    return Path(out_dir)
