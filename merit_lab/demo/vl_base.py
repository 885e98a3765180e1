"""Image-text demo base θ0: a tiny Qwen2-VL with a character-level tokenizer and image processor.

``pretrain_vl_base`` trains it on a separately seeded draw of every image-text demo source (fresh
pictures, never the mixture's) so it answers the four question families but hedges between the
planted answer conventions, then saves model, tokenizer, chat template and image processor as a
Hugging Face folder (``data/demo-vl/base/``) that ``AutoProcessor`` and
``AutoModelForImageTextToText`` load back.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from merit_lab.data.multimodal import ImageTextTokenizer
from merit_lab.demo.base import train_from_batches
from merit_lab.demo.vl_tasks import draw_scene, sample_vl_example, vl_sources
from merit_lab.io import atomic_dir, atomic_write_json

__all__ = [
    "VL_CHAT_TEMPLATE",
    "VL_SPECIAL_TOKENS",
    "build_vl_processor",
    "build_vl_tokenizer",
    "pretrain_vl_base",
    "vl_model_config",
]

PAD, UNK, IM_START, IM_END = "<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
VL_SPECIAL_TOKENS: tuple[str, ...] = (
    PAD,
    UNK,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    VIDEO_PAD,
)

# Qwen2-VL's layout (`<|im_start|>role\n...<|im_end|>\n`, an image part as
# `<|vision_start|><|image_pad|><|vision_end|>`, which the processor widens to one pad token per
# merged patch), without the default system turn. Rendering messages[:i] with the generation
# prompt is a prefix of messages[:i+1], so `formatting.render_spans` finds each response.
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PATCH, MERGE, IMAGE_SIDE = 4, 2, 32  # 8×8 patches of 4 px → 16 image tokens per picture


def build_vl_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer (one token per character) with Qwen2-VL's special tokens.

    ``tokenizer_class`` is saved as ``TokenizersBackend``: a ``qwen2_vl`` folder would otherwise
    be rebuilt as ``Qwen2Tokenizer`` (byte-level BPE), which ignores this vocabulary.
    """
    chars = string.digits + string.ascii_letters + string.punctuation + " \n"
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(VL_SPECIAL_TOKENS)}
    for c in sorted(set(chars)):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(VL_SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IM_START, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD],
        model_max_length=256,
        padding_side="right",
    )
    fast.chat_template = VL_CHAT_TEMPLATE
    return fast


def build_vl_processor() -> ImageTextTokenizer:
    """Tokenizer + Qwen2-VL image processor (Pillow backend; a 32×32 picture stays 32×32:
    8×8 patches of 4 pixels, merged 2×2 into 16 image tokens)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    side = IMAGE_SIDE * IMAGE_SIDE
    images = Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, min_pixels=side, max_pixels=side
    )
    tok = build_vl_tokenizer()
    return ImageTextTokenizer(tok, images, tok.convert_tokens_to_ids(IMAGE_PAD))


def vl_model_config(tokenizer) -> object:
    """The tiny Qwen2-VL (~0.6M parameters): a 2-block vision tower (width 64, 4-pixel
    patches), its 2×2 patch merger (the projector) and a 2-layer language model (width 128)."""
    from transformers import Qwen2VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(
        depth=2,
        embed_dim=64,
        hidden_size=128,
        mlp_ratio=2,
        num_heads=4,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
    )
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids(IMAGE_PAD),
        video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END),
        tie_word_embeddings=True,
    )


def _case_noise(answer: str, rng: random.Random, p: float) -> str:
    """Flip the case of each letter of the answer word after its first with probability ``p``
    (the text demo's ``case_noise``): θ0 stays unsure of the case of every letter, not only the
    first, so the case convention is a gradient over the whole word."""
    head = "Answer: " if answer.startswith("Answer: ") else ""
    body = answer[len(head) :]
    return head + body[0] + "".join(c.swapcase() if rng.random() < p else c for c in body[1:])


def _batch(
    tokenizer, rng: random.Random, batch_size: int, case_noise: float
) -> dict[str, torch.Tensor]:
    from PIL import Image

    from merit_lab.data.formatting import collate, tokenize_example

    sources = vl_sources()
    toks = []
    for _ in range(batch_size):
        source = rng.choice(sources)
        img, word = draw_scene(source.family, rng)
        example = sample_vl_example(source, Image.fromarray(img), word)
        answer = example["messages"][-1]
        answer["content"] = _case_noise(answer["content"], rng, case_noise)
        toks.append(tokenize_example(tokenizer, example))
    return collate(toks, tokenizer.pad_token_id)


def pretrain_vl_base(
    out_dir: Path,
    *,
    seed: int = 0,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup: int = 30,
    case_noise: float = 0.15,
    overwrite: bool = True,
) -> Path:
    """Pretrain the image-text demo base θ0 and save it as an HF folder.

    Every source is equally likely in the draw, so θ0 learns each family and both conventions
    of each planted axis equally. Only response tokens are trained.

    Args:
        out_dir: Destination folder (``data/demo-vl/base``), written atomically.
        seed: Seed of the initialisation and of the training draw.
        steps: Optimiser steps.
        batch_size: Examples per step.
        lr: Peak AdamW learning rate (linear warmup, cosine decay to 10%).
        warmup: Warmup steps.
        case_noise: Probability that each answer letter after the first takes the other case
            in the draw (as in the text demo's pretraining; the mixture has none).
        overwrite: Replace an existing ``out_dir``.

    Returns:
        ``out_dir``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than two contending ones
    try:
        return _pretrain(out_dir, seed, steps, batch_size, lr, warmup, case_noise, overwrite)
    finally:
        torch.set_num_threads(threads)


def _pretrain(
    out_dir: Path,
    seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    case_noise: float,
    overwrite: bool,
) -> Path:
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = build_vl_processor()
    model = Qwen2VLForConditionalGeneration(vl_model_config(tokenizer))
    model.train()
    rng = random.Random(f"merit-lab-demo-vl-pretrain:{seed}")
    ema, seconds = train_from_batches(
        model,
        lambda: _batch(tokenizer, rng, batch_size, case_noise),
        steps=steps,
        lr=lr,
        warmup=warmup,
        desc="pretrain the image-text demo base",
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
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "pretrain.json", info)
    return Path(out_dir)
