"""LoRA branches: the exact merge θ0 + Σ w_k s_k B_k A_k (dense folder and stacked adapter) against
a float64 reference and peft's own ``cat`` merge, the naive factor average it replaces, LoRA
branch training with resume, the pipeline's LoRA rows and the LoRA gradient bank."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merit_lab.merging.lora import LoraAdapter, merge_lora
from merit_lab.models.loading import build_pico_llama

# The merged folder rounds each float64 sum once to float32: its error is at most half an ulp,
# 2^-24 of the value's magnitude. The stacked adapter's B blocks w_k s_k B_k are float32 too.
F32_ROUNDING = 2.0**-24


def _reference(base: Path, adapters: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """θ0 + Σ w_k s_k B_k A_k in float64, straight from the files (no merit_lab code)."""
    out = {k: v.double() for k, v in load_file(base / "model.safetensors").items()}
    for folder, w in zip(adapters, weights, strict=True):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        s = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
        t = load_file(folder / "adapter_model.safetensors")
        for key in t:
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = t[key.replace("lora_A", "lora_B")].double()
                out[module + ".weight"] += w * s * (b @ t[key].double())
    return out


def _make_adapter(base: Path, out: Path, seed: int, r: int, alpha: float, **kw) -> Path:
    """A peft LoRA adapter on θ0 with random A and B (as after training), saved to ``out``."""
    from peft import get_peft_model

    from merit_lab.models.loading import load_model
    from merit_lab.models.lora import make_lora_config

    torch.manual_seed(seed)
    model = get_peft_model(load_model(base, device="cpu"), make_lora_config(r, alpha, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora_assets(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A pico Llama θ0 and three adapters of ranks 2, 4 and 3 (one rsLoRA), all linear layers."""
    root = tmp_path_factory.mktemp("lora")
    build_pico_llama(vocab_size=64, seed=0).save_pretrained(root / "base")
    adapters = [
        _make_adapter(root / "base", root / "a0", 1, r=2, alpha=4.0),
        _make_adapter(root / "base", root / "a1", 2, r=4, alpha=16.0),
        _make_adapter(root / "base", root / "a2", 3, r=3, alpha=6.0, rslora=True),
    ]
    return root / "base", adapters


def test_naive_factor_average_is_not_the_average_update():
    """Hand-made: two rank-1 updates on orthogonal directions, w = 1/2 each. Averaging A's and
    B's separately adds the cross terms f1 e2ᵀ, f2 e1ᵀ: the error is 0.5 (Frobenius) against a
    true update of norm 1/√2, i.e. 71% of it."""
    e, f = torch.eye(4, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    a = [e[0:1], e[1:2]]  # (1, 4)
    b = [f[:, 0:1], f[:, 1:2]]  # (3, 1)
    true = 0.5 * b[0] @ a[0] + 0.5 * b[1] @ a[1]
    naive = (0.5 * b[0] + 0.5 * b[1]) @ (0.5 * a[0] + 0.5 * a[1])
    err = torch.linalg.norm(naive - true)
    assert err.item() == pytest.approx(0.5)
    assert (err / torch.linalg.norm(true)).item() == pytest.approx(0.5**0.5, rel=1e-12)


def test_naive_average_differs_on_real_adapters(lora_assets):
    base, adapters = lora_assets
    same_rank = [adapters[0], _make_adapter(base, adapters[0].parent / "a0b", 9, r=2, alpha=4.0)]
    ads = [LoraAdapter.open(p) for p in same_rank]
    key = next(iter(ads[0].modules))
    true = sum(0.5 * ad.delta(key) for ad in ads)
    a_avg = sum(0.5 * ad.factors(key)[0].double() for ad in ads)
    b_avg = sum(0.5 * ad.factors(key)[1].double() for ad in ads)
    naive = ads[0].scale * b_avg @ a_avg
    rel = (torch.linalg.norm(naive - true) / torch.linalg.norm(true)).item()
    assert rel > 0.5, rel  # random factors: the cross terms are as large as the update


def test_merged_folder_and_stacked_adapter_equal_the_float64_reference(lora_assets, tmp_path):
    from peft import PeftModel

    from merit_lab.models.loading import load_model

    base, adapters = lora_assets
    weights = [0.2, 0.5, 0.3]
    report = merge_lora(adapters, tmp_path / "m", base=base, weights=weights, progress=False)
    ref = _reference(base, adapters, weights)
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert merged.keys() == ref.keys()
    worst = max((merged[k].double() - ref[k]).abs().max().item() for k in ref)
    scale = max(ref[k].abs().max().item() for k in ref)
    assert worst <= F32_ROUNDING * scale, (worst, scale)  # rounding to float32 only
    untouched = load_file(base / "model.safetensors")
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(merged[k], untouched[k])  # not adapted: θ0's bits

    stacked = LoraAdapter.open(tmp_path / "m" / "adapter")
    assert stacked.rank == 2 + 4 + 3 and stacked.scale == 1.0
    for key in stacked.modules:
        a, b = stacked.factors(key)
        assert a.shape[0] == b.shape[1] == 9
        delta = ref[key] - untouched[key].double()
        assert (stacked.delta(key) - delta).abs().max().item() <= 4 * F32_ROUNDING * scale
    # peft loads it, and its merged weights are ours (float32 arithmetic inside peft)
    peft_model = PeftModel.from_pretrained(load_model(base, device="cpu"), tmp_path / "m/adapter")
    via_peft = peft_model.merge_and_unload().state_dict()
    assert max((via_peft[k].double() - ref[k]).abs().max().item() for k in ref) < 1e-6
    manifest = json.loads((tmp_path / "m" / "merge_manifest.json").read_text())
    assert (manifest["format"], manifest["version"]) == ("merit-lab/merge-manifest", 1)
    assert manifest["lora"]["adapter_rank"] == 9 and manifest["weights"] == weights
    assert report.n_tensors == len(ref)
    # bare adapters hold no dense model: no mergekit export, and the manifest says why
    assert not (tmp_path / "m" / "mergekit.yaml").exists()
    assert manifest["mergekit_export"] is None
    assert "mergekit has no merge that stacks LoRA" in manifest["mergekit_export_reason"]


def test_stacked_adapter_equals_peft_cat(lora_assets, tmp_path):
    """peft's ``add_weighted_adapter(combination_type="cat")`` is the peer's reference of the
    same construction (it folds w_k s_k into A, we into B): the updates B·A agree."""
    from peft import PeftModel

    from merit_lab.models.loading import load_model

    base, adapters = lora_assets
    plain = adapters[:2]  # peft's cat scales a new rsLoRA adapter by sqrt(R): leave rsLoRA out
    weights = [0.4, 0.6]
    merge_lora(plain, tmp_path / "m", base=base, weights=weights, progress=False)
    model = PeftModel.from_pretrained(load_model(base, device="cpu"), plain[0], adapter_name="a")
    model.load_adapter(plain[1], adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "cat", combination_type="cat")
    ours = LoraAdapter.open(tmp_path / "m" / "adapter")
    worst = 0.0
    for key in ours.modules:
        module = model.base_model.model.get_submodule(key.removesuffix(".weight"))
        theirs = module.scaling["cat"] * (
            module.lora_B["cat"].weight.double() @ module.lora_A["cat"].weight.double()
        )
        worst = max(worst, (ours.delta(key) - theirs).abs().max().item())
    assert worst < 1e-7, worst


def test_mismatched_adapters_fail_before_writing(lora_assets, tmp_path):
    base, adapters = lora_assets
    attn = _make_adapter(base, tmp_path / "attn", 4, r=2, alpha=4.0, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="adapts other modules"):
        merge_lora([adapters[0], attn], tmp_path / "m", base=base, progress=False)
    other = tmp_path / "other"
    build_pico_llama(vocab_size=64, seed=0, hidden_size=64).save_pretrained(other)
    with pytest.raises(ValueError, match="trained on another model"):
        merge_lora(adapters[:2], tmp_path / "m", base=other, progress=False)
    import shutil

    shutil.copytree(adapters[1], tmp_path / "moved")  # same shapes, recorded from another θ0
    (tmp_path / "moved" / "merit_branch.json").write_text('{"base_fingerprint": "f00"}')
    with pytest.raises(ValueError, match="different base"):
        merge_lora([adapters[0], tmp_path / "moved"], tmp_path / "m", base=base, progress=False)
    shutil.rmtree(tmp_path / "moved")
    with pytest.raises(ValueError, match="summing to 1"):
        merge_lora(adapters[:2], tmp_path / "m", base=base, weights=[0.7, 0.7], progress=False)
    assert not (tmp_path / "m").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attn", "other"]  # no temp folder


# ------------------------------------------------------------------------- branch training
class _Interrupt(Exception):
    pass


def _branch_spec(assets, out: Path, **kw):
    from merit_lab.training.spec import BranchSpec

    base, mix = assets
    return BranchSpec.from_dict(
        {
            "name": out.name,
            "base_model": str(base),
            "output_dir": str(out),
            "sources": ("add", "max"),
            "lr": 1e-2,
            "batch_size": 4,
            "grad_accum": 2,
            "mixture": {"path": str(mix), "eval_fraction": 0.1, "seed": 0, "calibration_n": 4},
            "max_length": 64,
            "device": "cpu",
            "save_steps": 2,
            "lora_r": 4,
            "lora_alpha": 8.0,
            "lora_dropout": 0.1,
            **kw,
        }
    )


@pytest.mark.usefixtures("one_thread")
def test_lora_branch_trains_resumes_and_writes_adapter_and_dense_model(tmp_path):
    from transformers import TrainerCallback

    from merit_lab.training.branch_log import read_log
    from merit_lab.training.spec import BranchSpec
    from merit_lab.training.trainer import train_branch
    from tests.conftest import write_pico_branch_assets

    assets = write_pico_branch_assets(tmp_path / "assets")  # 6 steps of 8
    spec = _branch_spec(assets, tmp_path / "killed")
    assert BranchSpec.load(spec.save(tmp_path / "spec.json")) == spec
    assert "lora_r" not in _branch_spec(assets, tmp_path / "x", lora_r=0).to_dict()  # old specs
    with pytest.raises(ValueError, match="ddp"):
        _branch_spec(assets, tmp_path / "x", distributed="fsdp")

    class StopAt(TrainerCallback):  # an in-process kill after checkpoint-4
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                stopped.append(time.time())
                raise _Interrupt

    stopped: list[float] = []

    with pytest.raises(_Interrupt):
        train_branch(spec, callbacks=[StopAt()])
    assert (tmp_path / "killed/checkpoints/checkpoint-4/adapter_model.safetensors").is_file()
    final = train_branch(spec)  # resumes from checkpoint-4: adapter, optimizer, RNG, data
    ref = train_branch(_branch_spec(assets, tmp_path / "ref"))
    a, b = (LoraAdapter.open(f) for f in (final, ref))
    for key in a.modules:
        for x, y in zip(a.factors(key), b.factors(key), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    log, ref_log = read_log(tmp_path / "killed/log.jsonl"), read_log(tmp_path / "ref/log.jsonl")
    assert [r["step"] for r in log] == [r["step"] for r in ref_log]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref_log], rel=1e-4)
    # resumed, not restarted: steps 1-4 (up to checkpoint-4) are the first session's lines
    assert [r["time"] < stopped[0] for r in log] == [True, True, True, True, False, False]

    # final/: the dense model is θ0 + s·B·A of its own adapter, rounded once to float32
    dense = load_file(final / "model.safetensors")
    want = _reference(assets[0], [final / "adapter"], [1.0])
    assert dense.keys() == want.keys()
    assert max((dense[k].double() - want[k]).abs().max().item() for k in want) <= 2.0**-23
    theta0 = load_file(assets[0] / "model.safetensors")
    assert torch.equal(dense["model.embed_tokens.weight"], theta0["model.embed_tokens.weight"])
    moved = max((dense[k] - theta0[k]).abs().max().item() for k in a.modules)
    assert moved > 1e-3  # it trained
    manifest = json.loads((final / "merit_branch.json").read_text())
    assert manifest["spec"]["lora_r"] == 4 and manifest["tokens"] > 0
    assert not (tmp_path / "killed/checkpoints").exists()


# ------------------------------------------------------------------------ LoRA gradient bank
@pytest.mark.usefixtures("one_thread")
def test_lora_bank_is_the_gradient_of_the_warmed_up_adapter(tmp_path, tiny_mixture_dir):
    from merit_lab.config.schema import SketchSpec
    from merit_lab.data.formatting import collate, response_token_loss, tokenize_examples
    from merit_lab.data.mixture import load_mixture
    from merit_lab.gradients.estimate import estimate_gradients
    from merit_lab.gradients.lora_bank import (
        LoraWarmup,
        load_lora_model,
        lora_parameters,
        warm_up_lora,
        warmup_info,
    )
    from merit_lab.models.loading import load_model, load_tokenizer
    from tests.conftest import write_pico_branch_assets

    base, _ = write_pico_branch_assets(tmp_path / "assets", n=4)
    tok = load_tokenizer(base)
    mix = load_mixture(tiny_mixture_dir, calibration_n=4)
    pooled = [ex for s in mix for ex in tokenize_examples(tok, s.train, 64)]
    settings = LoraWarmup(steps=3, r=2, alpha=4.0, lr=1e-2, batch_size=4, seed=0)
    folder = warm_up_lora(base, tok, pooled, tmp_path / "w", settings, key="k1")
    record = json.loads((folder / "warmup.json").read_text())
    assert (record["format"], record["version"], record["key"]) == (
        "merit-lab/lora-warmup",
        1,
        "k1",
    )
    assert len(record["losses"]) == 3 and record["settings"]["r"] == 2
    a, b = (warm_up_lora(base, tok, pooled, tmp_path / f"w{i}", settings, key="k") for i in (2, 3))
    assert (a / "adapter_model.safetensors").read_bytes() == (
        b / "adapter_model.safetensors"
    ).read_bytes()  # seeded: the same adapter twice
    stamp = (folder / "adapter_model.safetensors").stat().st_mtime_ns
    warm_up_lora(base, tok, pooled, folder, settings, key="k1")  # current: reused
    assert (folder / "adapter_model.safetensors").stat().st_mtime_ns == stamp

    model = load_lora_model(load_model(base, device="cpu"), folder)
    names = ("src0_add", "src1_sub")
    bank = estimate_gradients(
        model,
        tok,
        mix,
        sketch=SketchSpec(kind="exact"),
        n=4,
        max_length=64,
        sources=names,
        lora=warmup_info(folder),
        progress=False,
    )
    params = lora_parameters(model)
    assert (
        bank.info["lora"]["warmup_key"] == "k1"
        and bank.rows.shape[1] == sum(p.numel() for _, p in params) == bank.info["n_parameters"]
    )
    for _, p in params:
        p.requires_grad_(True)  # loaded for inference: the reference turns them on itself
    for i, name in enumerate(names):  # the reference: autograd of the mean loss, by hand
        batch = collate(tokenize_examples(tok, mix[name].calibration, 64, limit=4), 0)
        grads = torch.autograd.grad(response_token_loss(model, batch), [p for _, p in params])
        want = torch.cat([g.flatten() for g in grads]).numpy()
        assert abs(want).max() > 0  # B ≠ 0 after the warm-up: A's gradient is not zero
        torch.testing.assert_close(
            torch.from_numpy(bank.rows[i]), torch.from_numpy(want), rtol=1e-4, atol=1e-7
        )
    # θ0's own weights took no gradient
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    # a gradient worker (calibration.workers > 1) loads the same adapter and gives the same rows
    from merit_lab.gradients.bank import read_part
    from merit_lab.gradients.workers import GradientJob, run_job

    job = GradientJob(
        worker=0,
        model=str(base),
        out_dir=str(tmp_path / "bank"),
        sources=names,
        mixture={"path": str(tiny_mixture_dir), "calibration_n": 4},
        sketch=SketchSpec(kind="exact").to_dict(),
        n=4,
        max_length=64,
        device="cpu",
        lora_adapter=str(folder),
    )
    done = run_job(job)
    assert done["info"]["key"] == bank.info["key"]  # the same bank: its parts are shared
    for i, name in enumerate(names):
        row, _ = read_part(tmp_path / "bank", name, done["info"], {})
        torch.testing.assert_close(torch.from_numpy(row), torch.from_numpy(bank.rows[i]))


def test_warmup_record_of_another_format_or_newer_version_is_refused(tmp_path):
    """warmup.json: a newer version or another format is refused naming the file (also where a
    run only checks whether its adapter is current); one from before the envelope still reads."""
    from merit_lab.envelope import EnvelopeError
    from merit_lab.gradients.lora_bank import read_warmup, warmup_info

    record = {"key": "k1", "settings": {"steps": 3, "r": 2}, "losses": [2.0, 1.5, 1.0]}
    path = tmp_path / "warmup.json"
    path.write_text(json.dumps(record))  # a record from before the envelope
    assert read_warmup(tmp_path) == record
    assert warmup_info(tmp_path) == {"warmup_key": "k1", "steps": 3, "r": 2}
    header = {"format": "merit-lab/lora-warmup", "version": 1}
    path.write_text(json.dumps({**header, **record}))
    assert read_warmup(tmp_path) == record
    cases = [
        ({**header, **record, "version": 2}, "merit-lab/lora-warmup version 2 is not one"),
        ({**record, "format": "merit-lab/gradient-job", "version": 1}, "holds 'merit-lab/grad"),
    ]
    for bad, match in cases:
        path.write_text(json.dumps(bad))
        with pytest.raises(EnvelopeError, match="warmup.json: .*" + match):
            warmup_info(tmp_path)


# ------------------------------------------------------------------ pipeline: LoRA rows end to end
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from merit_lab.config.schema import load_config
    from merit_lab.pipeline import run_pipeline
    from tests.conftest import write_demo_slice

    sources = [
        "reverse-a-terse-lower",
        "reverse-a-verbose-upper",
        "shift-a-terse-upper",
        "shift-a-verbose-lower",
    ]
    out = tmp_path_factory.mktemp("lora_run")
    data = write_demo_slice(out / "data", sources, {"train": 16, "calibration": 8, "eval": 3})
    cfg = {
        "name": "lora",
        "mixture": str(data),
        "output_dir": str(out / "runs"),
        "device": "cpu",
        "calibration": {"n": 8, "micro_batch_size": 8, "lora_warmup_steps": 2},
        "sketch": {"kind": "countsketch", "dim": 4096, "seed": 0},
        "partition": {"method": "balanced", "r": 1},
        "train": {"batch_size": 8, "lr": 3e-3, "save_steps": 50, "lora_r": 4, "lora_alpha": 8},
        "experiments": [
            {"name": "joint-1ep", "kind": "joint", "epochs": 1},
            {"name": "merit-1d", "merges": ["linear", "ties"]},
        ],
        "merge": {"params": {"ties": {"density": 0.5}}},
        "eval": {"max_examples": 2, "max_new_tokens": 4, "splits": ["eval"]},
        "diagnostics": {
            "experiments": ["merit-1d"],
            "max_examples": 2,
            "alphas": 3,
            "sigmas": [0.0, 0.01],
            "seeds": [0],
            "hessian_k": 2,
            "hessian_iter": 4,
            "curvature_examples": 1,
        },
    }
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = load_config(out / "cfg.yaml")
    run = run_pipeline(config, until="report")
    torch.set_num_threads(threads)
    return config, run


def test_lora_run_merges_exactly_evaluates_diagnoses_and_reports(lora_run):
    import numpy as np
    import pandas as pd

    from merit_lab.gradients.bank import GradientBank
    from merit_lab.models.loading import resolve_model_path
    from merit_lab.pipeline.curation import branch_dirs

    cfg, run = lora_run
    bank = GradientBank.load(run.gradients)
    assert bank.info["lora"]["steps"] == 2 and bank.info["lora"]["r"] == 4  # the LoRA bank
    base = Path(resolve_model_path("demo"))
    finals = [d / "final" for d in branch_dirs(cfg, "merit-1d")]
    tokens = [json.loads((f / "merit_branch.json").read_text())["response_tokens"] for f in finals]
    weights = [n / sum(tokens) for n in tokens]
    merged_dir = run.root / "merged" / "merit-1d"
    merged = load_file(merged_dir / "model.safetensors")
    ref = _reference(base, [f / "adapter" for f in finals], weights)
    scale = max(ref[k].abs().max().item() for k in ref)
    assert max((merged[k].double() - ref[k]).abs().max().item() for k in ref) <= (
        F32_ROUNDING * scale
    )
    manifest = json.loads((merged_dir / "merge_manifest.json").read_text())
    assert manifest["weights"] == pytest.approx(weights) and manifest["lora"]["adapter_rank"] == 8
    # mergekit.yaml: a linear merge over the branches' dense models, which is the same model
    mk = yaml.safe_load((merged_dir / "mergekit.yaml").read_text())
    # the branches' folders relative to the merged one (the run's records move with it)
    assert [(merged_dir / m["model"]).resolve() for m in mk["models"]] == [
        f.resolve() for f in finals
    ]
    assert [m["parameters"]["weight"] for m in mk["models"]] == pytest.approx(weights)
    dense = [load_file(f / "model.safetensors") for f in finals]
    for k in ref:
        via_dense = sum(w * d[k].double() for w, d in zip(weights, dense, strict=True))
        assert (via_dense - ref[k]).abs().max().item() <= 4 * F32_ROUNDING * scale
    # ties runs on the branches' dense ΔW_k (the full-model merge), and is not the linear one
    ties = load_file(run.root / "merged" / "merit-1d+ties" / "model.safetensors")
    assert any(not torch.equal(ties[k], merged[k]) for k in ref)

    table = pd.read_parquet(run.root / "eval.parquet")
    assert {"theta0", "joint-1ep", "merit-1d", "merit-1d+ties"} <= set(table["model"])
    # the token-counted style metrics are NaN by design at max_new_tokens 4 (below the style
    # band's budget, `evaluate.style_budget`); every other value is a number
    from merit_lab.evaluation.evaluate import TOKEN_STYLE_METRICS

    token_style = table["metric"].isin(TOKEN_STYLE_METRICS)
    assert np.isfinite(table.loc[~token_style, "value"]).all()
    assert table.loc[token_style, "value"].isna().all()
    for name in ("paths", "displacement", "perturbation", "curvature", "gain"):
        text = (run.root / "diagnostics" / f"{name}.json").read_text()
        assert "NaN" not in text and "Infinity" not in text, name
    assert "merit-1d" in (run.root / "diagnostics" / "paths.json").read_text()
    assert (
        "LoRA r 4, alpha 8 (linear and uniform merges exact" in (run.root / "report.md").read_text()
    )


def test_lora_settings_are_validated_with_the_config(tmp_path):
    from merit_lab.config.schema import RunConfig
    from merit_lab.validate import config_problems

    bad = {"train": {"lora_r": -1, "lora_alpha": 0, "lora_dropout": 1.0}}
    with pytest.raises(ValueError) as err:
        RunConfig.from_dict(bad)
    for key in ("train.lora_r", "train.lora_alpha", "train.lora_dropout"):
        assert key in str(err.value)
    with pytest.raises(ValueError, match="train.lora_r: LoRA branches train with distributed"):
        RunConfig.from_dict({"train": {"lora_r": 4, "distributed": "fsdp"}})
    cfg = RunConfig.from_dict({"calibration": {"lora_warmup_steps": 5}})
    assert any(p.startswith("calibration.lora_warmup_steps:") for p in config_problems(cfg))
    ok = RunConfig.from_dict({"train": {"lora_r": 4, "lora_target_modules": ["q_proj"]}})
    assert ok.train.lora_target_modules == ("q_proj",)
