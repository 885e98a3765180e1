"""Model stage: load a base model and tokenizer, choose which parameters count, build tiny models.

Input: a Hugging Face model folder or hub id. Output: a causal LM in eval mode on the chosen device
and dtype, and the ordered list of selected parameters (name, shape) the gradient bank sketches.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "build_pico_llama",
    "load_model",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_path",
    "select_parameters",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; ``"cuda"`` without a GPU falls back to CPU."""
    if isinstance(device, torch.device):
        return device
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.device(device)
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """``"auto"`` is bfloat16 on a CUDA device that supports it, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        cuda = device is not None and device.type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_model_path(model: str | Path) -> str:
    """``"demo"`` is the bundled base model (``data/demo/base``); anything else is kept as is."""
    if str(model) == "demo":
        from merit_lab.demo import DEMO_DIR

        return str(DEMO_DIR / "base")
    return str(model)


def load_tokenizer(model: str | Path, *, trust_remote_code: bool = False):
    """Load the tokenizer of ``model`` and make sure it has a pad token (EOS when missing)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        resolve_model_path(model), trust_remote_code=trust_remote_code
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    model: str | Path,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
):
    """Load a causal LM from safetensors only (no pickled weights), in eval mode.

    ``trust_remote_code`` stays off unless the run's config turns it on.
    """
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    path = resolve_model_path(model)
    if Path(path).is_dir() and not any(Path(path).glob("*.safetensors")):
        raise FileNotFoundError(
            f"{path}: no .safetensors weights; merit-lab loads safetensors only "
            "(convert pickled .bin weights with save_pretrained(safe_serialization=True))"
        )
    net = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=resolve_dtype(dtype, dev),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    return net.to(dev).eval()


def select_parameters(
    model: torch.nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters whose names match any ``include`` glob and no ``exclude`` glob.

    Globs use ``fnmatch`` (``*`` matches dots too), e.g. ``"*.mlp.*"`` or ``"*embed_tokens*"``.
    Tied parameters appear once (``named_parameters`` deduplicates them).

    Raises:
        ValueError: when the patterns select nothing.
    """
    chosen = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if include and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            continue
        chosen.append((name, p))
    if not chosen:
        raise ValueError(f"parameter patterns include={include} exclude={exclude} select nothing")
    return chosen


def build_pico_llama(
    vocab_size: int = 64, *, seed: int = 0, hidden_size: int = 32, layers: int = 2
):
    """A deterministic "pico" Llama (hidden 32, 2 layers) for tests, built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
