"""Image-text examples: image content parts, the processor as a tokenizer, pixel batches.

Input: chat examples whose user turns hold content parts (``{"type": "image", "image": path}``,
``{"type": "text", "text": str}``; a path is an image file, or ``<archive>.zip::<member>``, an
image read on demand from a zip that is never extracted) and a Qwen2-VL-style processor. Output:
checked, resolved image paths; `ImageTextTokenizer` (what `models.load_tokenizer` returns for a
model folder with an image processor); the patches, grids and image-token expansion that
`formatting` puts into `TokenizedExample`s and batches.
"""

from __future__ import annotations

import functools
import io
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "IMAGE_PART_TYPES",
    "ZIP_SEPARATOR",
    "ImageTextTokenizer",
    "checkpoint_names",
    "collate_images",
    "content_problem",
    "encode_images",
    "example_images",
    "expand_image_tokens",
    "has_images",
    "image_bytes",
    "image_problem",
    "image_processor_of",
    "in_model_names",
    "load_image",
    "model_named",
    "require_image_processor",
    "resolve_image_parts",
    "split_zip_ref",
]

IMAGE_PART_TYPES = ("text", "image")
IMAGE_TOKEN = "<|image_pad|>"  # Qwen2-VL's image placeholder
ZIP_SEPARATOR = "::"  # "<archive>.zip::<member>": an image inside a zip archive


class ImageTextTokenizer:
    """A tokenizer that also holds its model's image processor: what `models.load_tokenizer`
    returns for a folder with a ``preprocessor_config.json``.

    Tokenizer attributes and calls are the tokenizer's (``pad_token_id``,
    ``apply_chat_template``, ``decode``, ``__call__``...); ``save_pretrained`` writes tokenizer,
    chat template and ``preprocessor_config.json``, so a branch's folder loads back with its
    images. (Not transformers' ``ProcessorMixin``: in transformers 5 a Qwen2-VL processor cannot
    be built without torchvision, which its video processor needs.)

    Attributes:
        tokenizer: the text tokenizer.
        image_processor: the image processor (``patch_size``, ``merge_size``, ``__call__``).
        image_token_id: the placeholder token an image part renders as (``<|image_pad|>``).
    """

    def __init__(self, tokenizer: Any, image_processor: Any, image_token_id: int) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = int(image_token_id)

    @classmethod
    def from_pretrained(cls, folder: str | Path, tokenizer: Any) -> ImageTextTokenizer:
        """``tokenizer`` with the image processor of ``folder`` (Pillow backend when torchvision
        is absent); the image token is the config's ``image_token_id``, else ``<|image_pad|>``."""
        from transformers import AutoImageProcessor

        from merit_lab.io import read_json

        config = Path(folder) / "config.json"
        token_id = read_json(config).get("image_token_id") if config.is_file() else None
        if token_id is None:
            token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        return cls(tokenizer, AutoImageProcessor.from_pretrained(str(folder)), token_id)

    def __getattr__(self, name: str) -> Any:
        if name == "tokenizer":  # unpickling: not set yet
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Any:
        self.image_processor.save_pretrained(save_directory, **kwargs)
        return self.tokenizer.save_pretrained(save_directory, **kwargs)


def image_processor_of(tokenizer: Any) -> Any | None:
    """The image processor behind ``tokenizer`` (an `ImageTextTokenizer`), else None."""
    return getattr(tokenizer, "image_processor", None) if tokenizer is not None else None


def require_image_processor(tokenizer: Any) -> Any:
    """The image processor behind ``tokenizer``; ValueError when it has none (a text model)."""
    if (proc := image_processor_of(tokenizer)) is None:
        raise ValueError(
            "the example has image parts but the model has no image processor (no "
            "preprocessor_config.json in its folder): use an image-text model, or remove the "
            "image parts"
        )
    return proc


def content_problem(role: str, content: Any) -> str | None:
    """What is wrong with a message's content (None when nothing), as a phrase starting with
    "content": a string is fine; so is, for a user or system turn, a list of ``text`` and
    ``image`` parts holding at least one image (a list of text parts is joined by the user)."""
    if isinstance(content, str):
        return None
    if isinstance(content, np.ndarray):  # parquet
        content = content.tolist()
    text_only = "content must be a string (join a list of content parts into one text"
    if role == "assistant" or not isinstance(content, (list, tuple)) or not content:
        return f"{text_only}; an assistant turn is text)"
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in IMAGE_PART_TYPES:
            return f"content[{k}]: expected a part with type 'text' or 'image', got {part!r:.80}"
        key = "text" if kind == "text" else "image"
        if not isinstance(part.get(key), str) or not part[key]:
            return f"content[{k}]: a {kind!r} part needs a non-empty string {key!r}"
    if not any(part["type"] == "image" for part in content):
        return f"{text_only}; a list of parts is for turns with images)"
    return None


def has_images(example: Mapping) -> bool:
    """Whether any message of ``example`` holds an image part."""
    return any(not isinstance(m["content"], str) for m in example["messages"])


def example_images(example: Mapping) -> list[str]:
    """The image paths of ``example``, in the order the chat template renders them."""
    return [
        part["image"]
        for m in example["messages"]
        if not isinstance(m["content"], str)
        for part in m["content"]
        if part["type"] == "image"
    ]


def split_zip_ref(path: str) -> tuple[str, str] | None:
    """``(archive, member)`` of an image path ``<archive>.zip::<member>``; None for a file."""
    archive, sep, member = str(path).partition(ZIP_SEPARATOR)
    if sep and member and archive.lower().endswith(".zip"):
        return archive, member
    return None


@functools.lru_cache(maxsize=8)
def _open_archive(path: str, pid: int) -> zipfile.ZipFile:
    """One open archive per file and process (its central directory is read once; a forked
    worker opens its own, so no two processes share a file offset)."""
    return zipfile.ZipFile(path)


def image_bytes(path: str) -> bytes:
    """The bytes of the image at ``path``: a file, or a zip member (``<archive>.zip::<member>``,
    read from the archive without extracting it)."""
    ref = split_zip_ref(path)
    if ref is None:
        return Path(path).read_bytes()
    return _open_archive(ref[0], os.getpid()).read(ref[1])


def _member_problem(archive: str, member: str) -> str | None:
    """Why ``member`` of ``archive`` cannot be read (None when it can)."""
    if not Path(archive).is_file():
        return f"image archive {archive} not found"
    try:
        names = _open_archive(archive, os.getpid()).NameToInfo
    except (OSError, zipfile.BadZipFile) as e:
        return f"image archive {archive} is not a readable zip ({type(e).__name__}: {e})"
    return None if member in names else f"image {member!r} is not in {archive}"


@functools.lru_cache(maxsize=4096)
def image_problem(path: str) -> str | None:
    """Why the image at ``path`` (a file, or ``<archive>.zip::<member>``) cannot be used (None
    when it can): missing, or not an image Pillow reads. Cached: a mixture refers to one image
    from many examples."""
    from PIL import Image, UnidentifiedImageError

    ref = split_zip_ref(path)
    if ref is None and not Path(path).is_file():
        return f"image {path} not found"
    if ref is not None and (problem := _member_problem(*ref)):
        return problem
    try:
        source = Path(path) if ref is None else io.BytesIO(image_bytes(path))
        with Image.open(source) as im:
            im.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, zipfile.BadZipFile) as e:
        return f"image {path} is not readable ({type(e).__name__}: {e})"
    return None


def _absolute(path: str, root: Path) -> str:
    """``path`` (a file or a zip member) with its file part made absolute against ``root``."""
    archive, member = split_zip_ref(path) or (path, None)
    file = Path(archive).expanduser()
    file = file if file.is_absolute() else (root / file).resolve()
    return str(file) if member is None else f"{file}{ZIP_SEPARATOR}{member}"


def resolve_image_parts(example: dict, root: Path) -> str | None:
    """Make the image paths of ``example`` absolute (relative ones are relative to ``root``, the
    mixture folder) in place, and check each one: the first problem, or None."""
    for m in example["messages"]:
        if isinstance(m["content"], str):
            continue
        parts = []
        for part in m["content"]:
            part = dict(part)
            if part["type"] == "image":
                part["image"] = _absolute(part["image"], root)
                if problem := image_problem(part["image"]):
                    return problem
            parts.append(part)
        m["content"] = parts
    return None


def load_image(path: str):
    """The image at ``path`` (a file, or ``<archive>.zip::<member>``) as an RGB PIL image."""
    from PIL import Image

    source = path if split_zip_ref(path) is None else io.BytesIO(image_bytes(path))
    with Image.open(source) as im:
        return im.convert("RGB")


def encode_images(tokenizer: Any, paths: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches and grids of ``paths`` (image files, or PIL images) through ``tokenizer``'s image
    processor.

    Returns:
        ``pixel_values`` (P, C·T·p·p) float32, the patches of all images one after another, and
        ``image_grid_thw`` (n, 3) int64, each image's (t, h, w) patch grid.
    """
    proc = require_image_processor(tokenizer)
    parts = [
        _encode_file(proc, str(p)) if isinstance(p, (str, Path)) else _encode(proc, p)
        for p in paths
    ]
    return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])


def _encode(proc: Any, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
    out = proc(images=[image], return_tensors="pt")
    return out["pixel_values"].float(), out["image_grid_thw"].long()


@functools.lru_cache(maxsize=8192)
def _encode_file(proc: Any, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One image file through ``proc``, once per process: the sources of a mixture often share
    pictures (the demo's four conventions of a family do), and every stage tokenises them."""
    return _encode(proc, load_image(path))


def expand_image_tokens(
    ids: Sequence[int], labels: Sequence[int], tokenizer: Any, grid_thw: torch.Tensor, ignore: int
) -> tuple[list[int], list[int], list[int]]:
    """Repeat each image placeholder token once per merged patch of its image, as the
    processor's ``__call__`` does to the text, with label ``ignore`` (images are never scored).

    Returns:
        (ids, labels, mm_token_type_ids): the last 1 at image tokens, 0 elsewhere.

    Raises:
        ValueError: the placeholders and the images differ in number.
    """
    image_id = tokenizer.image_token_id
    merge = tokenizer.image_processor.merge_size
    counts = [int(g.prod()) // merge**2 for g in grid_thw]
    found = sum(1 for t in ids if t == image_id)
    if found != len(counts):
        raise ValueError(
            f"{found} image placeholder token(s) in the rendered text but {len(counts)} image(s): "
            "the chat template must render one image token per image part"
        )
    out_ids: list[int] = []
    out_labels: list[int] = []
    types: list[int] = []
    k = 0
    for t, y in zip(ids, labels, strict=True):
        if t == image_id:
            out_ids += [t] * counts[k]
            out_labels += [ignore] * counts[k]
            types += [1] * counts[k]
            k += 1
        else:
            out_ids.append(t)
            out_labels.append(y)
            types.append(0)
    return out_ids, out_labels, types


def collate_images(
    batch: Sequence[Any], width: int, *, left: bool = False
) -> dict[str, torch.Tensor]:
    """The image inputs of a batch: ``pixel_values`` of all its images concatenated along dim 0
    in batch order (Qwen2-VL's layout), their ``image_grid_thw`` stacked, ``mm_token_type_ids``
    (B, width) padded with 0 on the right (``left``: on the left, for generation). Empty when no
    example of the batch has an image."""
    with_images = [ex for ex in batch if getattr(ex, "pixel_values", None) is not None]
    if not with_images:
        return {}
    types = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        if (row := getattr(ex, "mm_token_type_ids", None)) is not None:
            span = slice(width - len(row), width) if left else slice(0, len(row))
            types[i, span] = torch.tensor(row)
    return {
        "pixel_values": torch.cat([ex.pixel_values for ex in with_images]),
        "image_grid_thw": torch.cat([ex.image_grid_thw for ex in with_images]),
        "mm_token_type_ids": types,
    }


def checkpoint_names(model: torch.nn.Module) -> dict[str, str]:
    """Model state-dict name → the name of that tensor in the model's safetensors files, for the
    names that differ. transformers 5 writes some image-text models in their original layout:
    Qwen2-VL's ``model.language_model.layers.0...`` as ``model.layers.0...`` and
    ``model.visual.*`` as ``visual.*``; code that matches file tensors to the model needs this.
    Empty for a text LM. (Renamings only; a tensor transformers fuses or splits is left out.)"""
    from transformers.core_model_loading import revert_weight_conversion

    state = model.state_dict()  # fresh tensor objects per key, tied ones included
    by_id = {id(t): k for k, t in state.items()}
    saved = revert_weight_conversion(model, dict(state))
    return {by_id[id(t)]: k for k, t in saved.items() if id(t) in by_id and by_id[id(t)] != k}


class _Renamed(Mapping):
    """A read-only view of a name → tensor mapping under other names (lookups stay lazy)."""

    def __init__(self, weights: Mapping[str, Any], rename: Mapping[str, str]) -> None:
        self._weights = weights
        self._to_source = {rename.get(k, k): k for k in weights}

    def __getitem__(self, key: str) -> Any:
        return self._weights[self._to_source[key]]

    def __iter__(self):
        return iter(self._to_source)

    def __len__(self) -> int:
        return len(self._to_source)


def model_named(model: torch.nn.Module, weights: Mapping[str, Any]) -> Mapping[str, Any]:
    """``weights`` read from ``model``'s safetensors files, under the model's own state-dict names
    (`checkpoint_names` reversed); ``weights`` itself when no name differs (a text LM)."""
    names = checkpoint_names(model)
    if not names:
        return weights
    return _Renamed(weights, {saved: own for own, saved in names.items()})


@functools.lru_cache(maxsize=16)
def _saved_to_model(config_text: str) -> tuple[tuple[str, str], ...]:
    import json

    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto import modeling_auto as auto_names

    data = json.loads(config_text)
    kind = data.get("model_type")
    if kind not in auto_names.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or (
        kind in auto_names.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        return ()  # models.load_model loads it as a causal LM: names as saved
    config = AutoConfig.for_model(**data)
    with torch.device("meta"):  # names only: no memory, no initialisation
        model = AutoModelForImageTextToText.from_config(config)
    return tuple((saved, own) for own, saved in checkpoint_names(model).items())


def in_model_names(weights: Mapping[str, Any], folder: str | Path) -> Mapping[str, Any]:
    """The tensors of a model folder's safetensors files (``weights``, e.g. a lazy view) under
    the names of the model `models.load_model` builds from it (`model_named` without loading
    the model: it is built on the meta device from ``config.json``)."""
    config = Path(folder) / "config.json"
    rename = dict(_saved_to_model(config.read_text(encoding="utf-8"))) if config.is_file() else {}
    return _Renamed(weights, rename) if rename else weights
