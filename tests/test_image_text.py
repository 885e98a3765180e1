"""Image-text models through the stages: tokenizer round trip, response-only labels on a
hand-checked example, pixel batches, parameter presets, mixture image checks, greedy answers with
pixels and the merge of every part (tiny Qwen2-VL built from its config; no pretrained weights
except where the committed image-text demo base is named)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from merit_lab.data.formatting import (
    IGNORE_INDEX,
    collate,
    response_token_loss,
    tokenize_example,
    tokenize_examples,
)
from merit_lab.data.mixture import MixtureError, load_mixture
from merit_lab.data.multimodal import ImageTextTokenizer, checkpoint_names, in_model_names
from merit_lab.demo import DEMO_VL_DIR
from merit_lab.demo.vl_base import build_vl_processor, vl_model_config
from merit_lab.demo.vl_tasks import sample_vl_example, vl_sources
from merit_lab.diagnostics.measures import as_weights
from merit_lab.models.loading import build_pico_llama, load_model, load_tokenizer, select_parameters

BASE = DEMO_VL_DIR / "base"


@pytest.fixture(scope="module")
def tok():
    return build_vl_processor()


@pytest.fixture(scope="module")
def model(tok):
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(vl_model_config(tok)).eval()


def _picture(colour=(220, 40, 40)) -> Image.Image:
    img = np.full((32, 32, 3), 245, dtype=np.uint8)
    img[8:20, 4:16] = colour
    return Image.fromarray(img)


def _example(answer_image=None, text="What colour is the shape?", answer="red"):
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": answer_image or _picture()},
                    {"type": "text", "text": text},
                ],
            },
            {"role": "assistant", "content": answer},
        ]
    }


def test_tokenizer_and_image_processor_round_trip(tok, model, tmp_path):
    """Saved and loaded back (AutoTokenizer + AutoImageProcessor, through load_tokenizer): the
    same ids for the same text, the character-level vocabulary kept (not rebuilt as the
    byte-level Qwen2Tokenizer a qwen2_vl folder would otherwise get), the same patches."""
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    assert (tmp_path / "chat_template.jinja").is_file()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "TokenizersBackend"
    back = load_tokenizer(tmp_path)
    assert isinstance(back, ImageTextTokenizer)
    text = tok.apply_chat_template(_example()["messages"][:1], tokenize=False)
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert len(back) == len(tok) == 104
    assert back.image_token_id == tok.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert back.image_processor.patch_size == 4 and back.image_processor.merge_size == 2
    a, b = tokenize_example(tok, _example()), tokenize_example(back, _example())
    assert a.input_ids == b.input_ids and a.labels == b.labels
    assert torch.equal(a.pixel_values, b.pixel_values)
    loaded = load_model(tmp_path, device="cpu")
    assert type(loaded).__name__ == "Qwen2VLForConditionalGeneration"


def test_labels_are_the_response_only_on_a_hand_checked_example(tok):
    """<|im_start|>user\\n<|vision_start|> 16×<|image_pad|> <|vision_end|>What colour is the
    shape?<|im_end|>\\n<|im_start|>assistant\\nred<|im_end|>\\n: the labels are `red<|im_end|>`
    (4 tokens), every image, vision and prompt token is -100."""
    t = tokenize_example(tok, _example())
    ids = tok.convert_tokens_to_ids
    question = "What colour is the shape?"
    expected = (
        [ids("<|im_start|>"), *tok("user\n")["input_ids"], ids("<|vision_start|>")]
        + [ids("<|image_pad|>")] * 16
        + [ids("<|vision_end|>"), *tok(question)["input_ids"], ids("<|im_end|>")]
        + tok("\n")["input_ids"]
        + [ids("<|im_start|>"), *tok("assistant\n")["input_ids"]]
        + [*tok("red")["input_ids"], ids("<|im_end|>")]
        + tok("\n")["input_ids"]
    )
    assert list(t.input_ids) == expected
    scored = [i for i, y in enumerate(t.labels) if y != IGNORE_INDEX]
    assert [t.input_ids[i] for i in scored] == [*tok("red")["input_ids"], ids("<|im_end|>")]
    assert scored == list(range(len(expected) - 5, len(expected) - 1))
    assert sum(t.mm_token_type_ids) == 16
    assert [i for i, m in enumerate(t.mm_token_type_ids) if m] == list(range(7, 23))
    # 32×32 pixels → 8×8 patches of 3·2·4·4 values; one image, grid (1, 8, 8)
    assert tuple(t.pixel_values.shape) == (64, 96)
    assert t.image_grid_thw.tolist() == [[1, 8, 8]]


def test_collate_concatenates_patches_in_batch_order(tok, model):
    """Two images in one batch: patches stacked along dim 0 in batch order, grids stacked, the
    token types padded like the ids; the response-token loss equals the model's own loss."""
    a = tokenize_example(tok, _example(answer="red"))
    b = tokenize_example(
        tok, _example(answer_image=_picture((50, 80, 230)), answer="Answer: BLUE.")
    )
    batch = collate([a, b], tok.pad_token_id)
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "labels",
        "pixel_values",
        "image_grid_thw",
        "mm_token_type_ids",
    }
    assert torch.equal(batch["pixel_values"][:64], a.pixel_values)
    assert torch.equal(batch["pixel_values"][64:], b.pixel_values)
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
    assert int(batch["mm_token_type_ids"].sum()) == 32
    with torch.no_grad():
        ours = float(response_token_loss(model, batch))
        theirs = float(model(**batch).loss)
    assert ours == pytest.approx(theirs, rel=1e-5)
    # text-only batches keep exactly the three keys
    assert set(collate([a.__class__(a.input_ids, a.labels)], 0)) == {
        "input_ids",
        "attention_mask",
        "labels",
    }


def test_parameter_presets_select_the_qwen2_vl_parts(model):
    """language / vision / projector are non-empty, disjoint and cover the model; vision is the
    tower without its merger, the projector is the merger, language is the LM (tied head)."""
    names = {
        p: [n for n, _ in select_parameters(model, preset=p)]
        for p in ("all", "language", "vision", "projector", "attention", "mlp", "last-1")
    }
    lang, vis, proj = (set(names[p]) for p in ("language", "vision", "projector"))
    assert lang and vis and proj
    assert not (lang & vis) and not (lang & proj) and not (vis & proj)
    assert lang | vis | proj == set(names["all"])
    assert all(n.startswith("model.visual.") and ".merger." not in n for n in vis)
    assert all(n.startswith("model.visual.merger.") for n in proj) and len(proj) == 6
    assert all(n.startswith("model.language_model.") for n in lang)
    assert all(".self_attn." in n and "language_model" in n for n in names["attention"])
    assert all(".mlp." in n and "language_model" in n for n in names["mlp"])
    assert all("language_model.layers.1." in n for n in names["last-1"])
    numel = {p: sum(q.numel() for n, q in model.named_parameters() if n in names[p]) for p in names}
    assert numel["language"] + numel["vision"] + numel["projector"] == numel["all"] == 514304


def _write_mixture(root, image_ref):
    (root / "images").mkdir(parents=True)
    _picture().save(root / "images" / "a.png")
    lines = []
    for i, ref in enumerate(["images/a.png", image_ref]):
        ex = sample_vl_example(vl_sources()[0], ref, "red")
        lines.append(json.dumps({"id": f"x-{i}", **ex}))
    (root / "src.jsonl").write_text("\n".join(lines) + "\n")


def test_mixture_resolves_image_paths_against_the_mixture_folder(tmp_path):
    _write_mixture(tmp_path, "images/a.png")
    mix = load_mixture(tmp_path, calibration_n=1, eval_fraction=0.5)
    parts = [p for ex in mix["src"].train for p in ex["messages"][0]["content"]]
    assert {p["image"] for p in parts if p["type"] == "image"} == {
        str((tmp_path / "images" / "a.png").resolve())
    }


@pytest.mark.parametrize("bad", ["missing", "unreadable"])
def test_a_bad_image_is_one_error_naming_file_and_line(tmp_path, bad):
    _write_mixture(tmp_path, "images/b.png")
    if bad == "unreadable":
        (tmp_path / "images" / "b.png").write_bytes(b"not a png")
    with pytest.raises(MixtureError) as err:
        load_mixture(tmp_path)
    msg = str(err.value)
    assert f"{tmp_path / 'src.jsonl'}:2:" in msg and "b.png" in msg
    assert ("not found" if bad == "missing" else "not readable") in msg


def test_bad_content_parts_are_refused(tmp_path):
    ex = {
        "messages": [
            {"role": "user", "content": [{"type": "audio", "audio": "x"}]},
            {"role": "assistant", "content": "x"},
        ]
    }
    (tmp_path / "s.jsonl").write_text(json.dumps(ex) + "\n")
    with pytest.raises(MixtureError, match=r"s.jsonl:1: messages\[0\].content\[0\]: expected"):
        load_mixture(tmp_path)
    ex["messages"][1]["content"] = [{"type": "text", "text": "x"}]
    ex["messages"][0]["content"] = "hi"
    (tmp_path / "s.jsonl").write_text(json.dumps(ex) + "\n")
    with pytest.raises(MixtureError, match="an assistant turn is text"):
        load_mixture(tmp_path)
    ex["messages"][1]["content"] = "x"
    ex["messages"][0]["content"] = [{"type": "text", "text": "hi"}]  # no image: join the text
    (tmp_path / "s.jsonl").write_text(json.dumps(ex) + "\n")
    with pytest.raises(MixtureError, match=r"messages\[0\].content must be a string \(join"):
        load_mixture(tmp_path)


def test_image_example_over_max_length_is_not_cut(tok):
    t = tokenize_example(tok, _example())
    with pytest.raises(ValueError, match="image example is not cut"):
        tokenize_example(tok, _example(), max_length=t.n_tokens - 1)
    assert tokenize_examples(tok, [_example()], t.n_tokens - 1, "skip") == []


def test_text_model_refuses_image_parts():
    from merit_lab.demo.base import build_demo_tokenizer

    with pytest.raises(ValueError, match="no image processor"):
        tokenize_example(build_demo_tokenizer(), _example())


@pytest.mark.skipif(not (BASE / "model.safetensors").is_file(), reason="no committed base")
def test_greedy_answers_with_pixels_do_not_depend_on_batching():
    """The committed base answers in batches (left-padded ids and token types, patches in
    batch order) as it does one example at a time."""
    from merit_lab.evaluation.evaluate import greedy_answers

    tok, model = load_tokenizer(BASE), load_model(BASE, device="cpu")
    mix = load_mixture(DEMO_VL_DIR, calibration_n=8)
    examples = [ex for name in mix.names[::4] for ex in mix[name].eval[:3]]
    batched = greedy_answers(model, tok, examples, max_new_tokens=16, batch_size=32)
    alone = [greedy_answers(model, tok, [ex], max_new_tokens=16)[0] for ex in examples[:4]]
    assert batched[:4] == alone
    assert all(a for a in batched)


def test_merge_averages_vision_projector_and_language_and_carries_the_processor(
    tok, model, tmp_path
):
    """A linear merge of two image-text branches: every tensor (tower, merger, LM) is the
    average; the merged folder loads as an image-text model with its image processor."""
    from merit_lab.merging.stream import merge_checkpoints

    folders = []
    for k in range(2):
        m = type(model)(model.config)
        m.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * (k + 1))
        folder = tmp_path / f"b{k}"
        m.save_pretrained(folder)
        tok.save_pretrained(folder)
        folders.append(folder)
    out = tmp_path / "merged"
    merge_checkpoints(folders, out, method="linear")
    merged = load_model(out, device="cpu")
    for name, p in merged.named_parameters():
        ref = dict(model.named_parameters())[name]
        assert torch.allclose(p, ref + 0.015, atol=1e-6), name
    back = load_tokenizer(out)
    assert isinstance(back, ImageTextTokenizer) and back.image_processor.patch_size == 4
    # transformers 5 saves Qwen2-VL in its original layout (model.layers.*, visual.*); the
    # files' tensors map onto the model's own names one to one
    names = checkpoint_names(merged)
    assert (
        names["model.language_model.layers.0.mlp.up_proj.weight"]
        == "model.layers.0.mlp.up_proj.weight"
    )
    assert names["model.visual.merger.mlp.0.weight"] == "visual.merger.mlp.0.weight"
    files = in_model_names(as_weights(out), out)
    state = merged.state_dict()
    assert len(files) == len(state) - 1  # all but the tied lm_head
    assert all(torch.equal(files[k], state[k]) for k in files)
    assert checkpoint_names(build_pico_llama()) == {}
    shutil.rmtree(out)


def test_multi_process_image_text_branches_are_refused_before_any_work():
    """Null padding rows of a multi-process step break Qwen2-VL's position ids: refused."""
    from merit_lab.config.schema import RunConfig
    from merit_lab.validate import config_problems

    data = Path(__file__).resolve().parents[1] / "data" / "demo-vl"
    base = {"model": str(data / "base"), "mixture": str(data)}
    cfg = RunConfig.from_dict({**base, "train": {"procs_per_branch": 2, "batch_size": 32}})
    problems = config_problems(cfg, diagnose=False)
    assert any(p.startswith("train.procs_per_branch: image-text") for p in problems), problems
    ok = RunConfig.from_dict(base)
    assert not any("procs_per_branch" in p for p in config_problems(ok, diagnose=False))
