from __future__ import annotations

import pytest
import torch

from merit_lab.models.loading import (
    load_model,
    resolve_device,
    resolve_dtype,
    select_parameters,
)


def test_select_parameters_by_globs(pico_model):
    all_names = [n for n, _ in select_parameters(pico_model)]
    assert all_names == [n for n, _ in pico_model.named_parameters()]
    mlp = [n for n, _ in select_parameters(pico_model, include=["*.mlp.*"])]
    assert mlp and all(".mlp." in n for n in mlp)
    no_embed = [n for n, _ in select_parameters(pico_model, exclude=["*embed_tokens*", "lm_head*"])]
    assert len(no_embed) == len(all_names) - 2
    with pytest.raises(ValueError, match="selects nothing"):
        select_parameters(pico_model, include=["nope.*"])


def test_device_and_dtype_fall_back_to_cpu():
    if not torch.cuda.is_available():
        assert resolve_device("cuda") == torch.device("cpu")
        assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")


def test_load_model_safetensors_only(pico_model, tmp_path):
    pico_model.save_pretrained(tmp_path / "st", safe_serialization=True)
    m = load_model(tmp_path / "st", device="cpu")
    assert not m.training
    for a, b in zip(m.parameters(), pico_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    # A folder with only pickled weights is refused instead of unpickled.
    (tmp_path / "pkl").mkdir()
    pico_model.config.save_pretrained(tmp_path / "pkl")
    torch.save(pico_model.state_dict(), tmp_path / "pkl" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        load_model(tmp_path / "pkl", device="cpu")


def test_demo_base_loads_like_any_hf_model():
    m = load_model("demo", device="cpu", dtype="bfloat16")
    assert next(m.parameters()).dtype == torch.bfloat16
    assert m.config.model_type in ("llama", "qwen2")
