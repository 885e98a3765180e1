"""A model's shape before any weight is read: its ``config.json`` and safetensors headers.

Input: a config's ``model:`` ("demo", a fetched name, a local folder, a hub id) or a header
folder (``config.json``, ``model.safetensors.index.json`` and each shard's ``<shard>.header.json``,
as in ``data/model-headers/<org>/<name>/``). Output: `ModelHeader` (the config and every tensor's
dtype and shape), read from local files, the committed fixtures, or the hub by HTTP Range (the
first 8 + N bytes of each shard: the length, then the JSON header).
"""

from __future__ import annotations

import json
import math
import os
import struct
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merit_lab.config.paths import DATA_DIR
from merit_lab.models.checkpoints import DTYPES, INDEX_NAME, Checkpoint

__all__ = [
    "HEADER_DIR",
    "HEADER_SUFFIX",
    "ModelHeader",
    "fetch_hub_header",
    "find_model_header",
    "parse_safetensors_header",
    "read_header_dir",
]

HEADER_DIR = DATA_DIR / "model-headers"  # committed fixtures, one folder per hub id: <org>/<name>
HEADER_SUFFIX = ".header.json"  # a shard's JSON header, beside the index: <shard>.header.json
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
# Parameter-name prefixes of a vision tower (Qwen2-VL `visual.`, LLaVA `vision_tower.`, ...)
VISION_PREFIXES = (
    "visual.",
    "model.visual.",
    "vision_tower.",
    "model.vision_tower.",
    "vision_model.",
)


@dataclass(frozen=True)
class ModelHeader:
    """What a model is made of, from its config and weight-file headers: no tensor data."""

    config: Mapping[str, Any]  # config.json as written
    tensors: Mapping[str, tuple[str, tuple[int, ...]]]  # name → (safetensors dtype, shape)
    origin: str  # where it was read: a folder, a fixture folder or a hub URL

    @property
    def text_config(self) -> Mapping[str, Any]:
        """The language model's config (``text_config`` of an image-text model, or the config)."""
        return self.config.get("text_config") or self.config

    @property
    def n_parameters(self) -> int:
        """Elements of every floating-point tensor (tied weights are stored, and counted, once)."""
        return sum(math.prod(s) for d, s in self.tensors.values() if d.startswith(("F", "BF")))

    @property
    def n_vision_parameters(self) -> int:
        """Elements of the vision tower's tensors (0 for a text model)."""
        return sum(
            math.prod(s) for k, (_, s) in self.tensors.items() if k.startswith(VISION_PREFIXES)
        )

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor's data: the weight files less their headers."""
        return sum(math.prod(s) * DTYPES[d].itemsize for d, s in self.tensors.values())

    @property
    def dtype(self) -> str:
        """The floating-point dtype most parameters are stored in (``BF16``, ``F32``...)."""
        counts = Counter()
        for d, s in self.tensors.values():
            counts[d] += math.prod(s)
        return max((d for d in counts if d.startswith(("F", "BF"))), key=counts.__getitem__)

    def geometry(self) -> dict[str, int]:
        """The language model's sizes: hidden, intermediate, layers, heads, KV width, vocab."""
        c = self.text_config
        heads = int(c.get("num_attention_heads", 1))
        hidden = int(c["hidden_size"])
        head_dim = int(c.get("head_dim") or hidden // heads)
        return {
            "hidden": hidden,
            "intermediate": int(c.get("intermediate_size", 4 * hidden)),
            "layers": int(c["num_hidden_layers"]),
            "heads": heads,
            "kv": int(c.get("num_key_value_heads", heads)) * head_dim,
            "vocab": int(c["vocab_size"]),
        }


def parse_safetensors_header(data: bytes, where: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name → (dtype, shape) from the JSON header of a safetensors file (its ``__metadata__``
    left out); ValueError naming ``where`` when it is not one."""
    try:
        header = json.loads(data)
    except ValueError as e:
        raise ValueError(f"{where}: not a safetensors JSON header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: not a safetensors JSON header (not an object)")
    out = {}
    for key, value in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(value, dict) or value.get("dtype") not in DTYPES or "shape" not in value:
            raise ValueError(f"{where}: tensor {key!r} has no known dtype and shape: {value!r}")
        out[key] = (value["dtype"], tuple(int(n) for n in value["shape"]))
    return out


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no config.json")
    return json.loads(path.read_text(encoding="utf-8"))


def read_header_dir(folder: str | Path) -> ModelHeader:
    """A header folder: ``config.json``, the index (or one ``model.safetensors``) and a
    ``<shard>.header.json`` per shard; real ``.safetensors`` files are read for their headers."""
    folder = Path(folder)
    config = _read_config(folder / "config.json")
    if (folder / INDEX_NAME).is_file():
        weight_map = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    else:
        shards = [SINGLE_FILE]
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for shard in shards:
        fixture = folder / (shard + HEADER_SUFFIX)
        if fixture.is_file():
            tensors |= parse_safetensors_header(fixture.read_bytes(), str(fixture))
        elif (folder / shard).is_file():
            tensors |= {k: v[1:] for k, v in Checkpoint.open(folder).tensors.items()}
            break  # Checkpoint.open read every shard of the folder
        else:
            raise FileNotFoundError(f"{folder}: neither {shard} nor {shard + HEADER_SUFFIX}")
    return ModelHeader(config, tensors, str(folder))


# ------------------------------------------------------------------------------------ the hub
Opener = Callable[[urllib.request.Request], Any]


def _get(url: str, opener: Opener, first: int | None = None, last: int | None = None) -> bytes:
    """GET ``url`` (bytes ``first``..``last`` inclusive with a Range request): the body."""
    req = urllib.request.Request(url)
    if first is not None:
        req.add_header("Range", f"bytes={first}-{last}")
    if token := os.environ.get("HF_TOKEN"):
        req.add_header("Authorization", f"Bearer {token}")
    with opener(req) as resp:
        if first is None:
            return resp.read()
        n = last - first + 1
        # a server that ignores Range answers 200 with the whole file: read only what is asked
        data = resp.read(n) if getattr(resp, "status", 206) == 206 else resp.read(last + 1)[first:]
    if len(data) != n:
        raise ValueError(f"{url}: asked for {n} bytes, got {len(data)} (a cut-short file?)")
    return data


def fetch_hub_header(
    repo_id: str,
    *,
    revision: str = "main",
    endpoint: str | None = None,
    opener: Opener | None = None,
) -> ModelHeader:
    """A hub model's config and headers over HTTP, no weights: ``config.json``, the index
    (404: one ``model.safetensors``), then per shard a Range request for its first 8 bytes (the
    header's length N, little-endian u64) and one for bytes 8..8+N-1 (the JSON header).

    Args:
        endpoint: the hub's address (default ``$HF_ENDPOINT`` or https://huggingface.co).
        opener: ``urllib.request.urlopen`` or a stand-in (tests); ``$HF_TOKEN`` is sent if set.
    """
    opener = opener or (lambda req: urllib.request.urlopen(req, timeout=60))
    base = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    url = f"{base}/{repo_id}/resolve/{revision}"
    try:
        config = json.loads(_get(f"{url}/config.json", opener))
        try:
            weight_map = json.loads(_get(f"{url}/{INDEX_NAME}", opener))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
            shards = [SINGLE_FILE]
        tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
        for shard in shards:
            (n,) = struct.unpack("<Q", _get(f"{url}/{shard}", opener, 0, 7))
            if not 2 <= n <= MAX_HEADER_BYTES:
                raise ValueError(f"{url}/{shard}: header length {n} is not a safetensors header")
            tensors |= parse_safetensors_header(
                _get(f"{url}/{shard}", opener, 8, 8 + n - 1), f"{url}/{shard}"
            )
    except (urllib.error.URLError, OSError) as e:
        raise FileNotFoundError(
            f"model {repo_id!r}: its config and headers could not be read from {base} "
            f"({type(e).__name__}: {e}); give a local folder or --header-dir"
        ) from None
    return ModelHeader(config, tensors, url)


def _hub_cache(repo_id: str) -> Path | None:
    """The model's snapshot in the Hugging Face cache, if one is there (no network)."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or huggingface_hub's own offline errors
        return None
    return path if (path / "config.json").is_file() else None


def find_model_header(model: str, header_dir: str | Path | None = None) -> ModelHeader:
    """The header of a config's ``model:``, from the first place that has it.

    1. ``header_dir`` when given (a header folder or a model folder);
    2. ``"demo"``, a fetched name or a local folder: its own files;
    3. a hub id: the committed fixture ``HEADER_DIR/<org>/<name>/`` (generated from the
       published config: the plan prints the same table offline and online), then the
       Hugging Face cache, then the hub over HTTP (unless ``HF_HUB_OFFLINE=1``).

    Raises:
        FileNotFoundError: no config.json and headers anywhere; the message says what to give.
    """
    from merit_lab.models.fetch import FETCHABLE_MODELS
    from merit_lab.models.loading import HUB_ID, resolve_model_path

    if header_dir is not None:
        return read_header_dir(header_dir)
    local = Path(model).expanduser()
    if model == "demo" or model in FETCHABLE_MODELS or local.exists():
        folder = Path(resolve_model_path(model))
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"model {model!r}: {folder} has no config.json; give an HF model folder "
                "(config.json and safetensors weights) or --header-dir with its headers"
            )
        return read_header_dir(folder)
    if not HUB_ID.fullmatch(model) or "/" not in model:
        raise FileNotFoundError(
            f"model {model!r}: no such folder, and not a hub id (org/name); give an HF model "
            "folder or --header-dir"
        )
    if (HEADER_DIR / model / "config.json").is_file():
        return read_header_dir(HEADER_DIR / model)
    if (cached := _hub_cache(model)) is not None:
        return read_header_dir(cached)
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise FileNotFoundError(
            f"model {model!r}: no config.json and headers here (no fixture in {HEADER_DIR}, not "
            "in the Hugging Face cache) and HF_HUB_OFFLINE is set; give --header-dir, or run "
            "where the hub is reachable"
        )
    return fetch_hub_header(model)
