"""Write the committed header fixtures of data/model-headers/<org>/<name>/ from their config.json.

No weights are downloaded or made: the model is built on the meta device from the published
config (``AutoModel*.from_config`` under ``torch.device("meta")``), and its state dict's names,
shapes and the config's dtype are written as the hub lays them out: ``model.safetensors.index.json``
(``weight_map``, ``metadata.total_size``) and, per shard, the JSON header that opens the shard
(``<shard>.header.json``: ``{name: {dtype, shape, data_offsets}}``). Names follow the hub's files:
tied weights are left out (as ``save_pretrained`` does) and transformers' renaming of the
Qwen2.5-VL modules (``model.language_model.``, ``model.visual.``) is undone (``model.``,
``visual.``). Shards are filled in order up to 5 GB (transformers 4.x's ``max_shard_size``).

Run: python data/model-headers/make_headers.py  (from the repository root, with transformers)
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

HERE = Path(__file__).resolve().parent
MODELS = ("Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-VL-3B-Instruct")
SHARD_BYTES = 5 * 10**9
HUB_NAMES = ((r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual."))
DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def hub_state(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """Key → (safetensors dtype, shape) of the model the config describes, in hub names."""
    cfg = AutoConfig.from_pretrained(folder)
    vision = hasattr(cfg, "vision_config")
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(cfg)
    dtype = DTYPE_NAMES[getattr(torch, str(cfg.dtype).removeprefix("torch."))]
    tied = getattr(cfg, "tie_word_embeddings", False)
    out = {}
    for key, t in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        for pattern, repl in HUB_NAMES:
            key = re.sub(pattern, repl, key)
        out[key] = (dtype, list(t.shape))
    return out


def write_headers(repo_id: str) -> int:
    """Write one model's index and shard headers; returns its parameter count."""
    folder = HERE / repo_id
    state = hub_state(folder)
    size = {k: math.prod(s) * 2 if d != "F32" else math.prod(s) * 4 for k, (d, s) in state.items()}
    shards: list[list[str]] = [[]]
    for key in state:
        if shards[-1] and sum(size[k] for k in shards[-1]) + size[key] > SHARD_BYTES:
            shards.append([])
        shards[-1].append(key)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for old in folder.glob("*.header.json"):
        old.unlink()
    weight_map = {}
    for name, keys in zip(names, shards, strict=True):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for k in keys:
            header[k] = {
                "dtype": state[k][0],
                "shape": state[k][1],
                "data_offsets": [offset, offset + size[k]],
            }
            offset += size[k]
            weight_map[k] = name
        (folder / f"{name}.header.json").write_text(json.dumps(header, indent=1) + "\n")
    index = {"metadata": {"total_size": sum(size.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sum(math.prod(s) for _, s in state.values())


if __name__ == "__main__":
    for repo in MODELS:
        print(f"{repo}: {write_headers(repo):,} parameters")
