"""`merit-lab plan`: headers read without weights (folders, committed fixtures, the hub by HTTP
Range against a local server), the formulas on hand-worked cases, the disk of a tiny saved run,
the two paper configs printed offline, and the errors."""

from __future__ import annotations

import http.server
import json
import math
import struct
import threading
from pathlib import Path

import pytest
import torch
import yaml

from merit_lab.cli import main
from merit_lab.config.schema import RunConfig, TrainConfig, load_config
from merit_lab.models.headers import (
    HEADER_DIR,
    ModelHeader,
    fetch_hub_header,
    find_model_header,
    read_header_dir,
)
from merit_lab.models.loading import build_pico_llama
from merit_lab.training.cost import (
    LOGIT_BYTES,
    activation_bytes,
    gradient_stage_memory,
    lora_parameters,
    training_memory,
)
from merit_lab.training.plan import (
    CPU_CALIBRATION,
    GPU_CALIBRATION,
    H100_BF16_PEAK,
    calibrated_throughput,
    gpu_mfu,
    plan_run,
    training_runs,
)
from merit_lab.training.plan_table import format_plan, slurm_jobs
from merit_lab.training.sizes import find_mixture_sizes, sizes_from_record, stated_sizes

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {"Qwen/Qwen2.5-3B": 3.09e9, "Qwen/Qwen2.5-VL-3B-Instruct": 3.75e9}


def _header(**geometry) -> ModelHeader:
    """A hand-made header: a Llama-like model of the given sizes, fp32, untied head."""
    g = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2}
    g |= {"num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 10} | geometry
    h, i, v, kv = g["hidden_size"], g["intermediate_size"], g["vocab_size"], h_kv(g)
    tensors = {"model.embed_tokens.weight": ("F32", (v, h)), "lm_head.weight": ("F32", (v, h))}
    for n in range(g["num_hidden_layers"]):
        p = f"model.layers.{n}"
        tensors |= {
            f"{p}.self_attn.q_proj.weight": ("F32", (h, h)),
            f"{p}.self_attn.k_proj.weight": ("F32", (kv, h)),
            f"{p}.self_attn.v_proj.weight": ("F32", (kv, h)),
            f"{p}.self_attn.o_proj.weight": ("F32", (h, h)),
            f"{p}.mlp.gate_proj.weight": ("F32", (i, h)),
            f"{p}.mlp.up_proj.weight": ("F32", (i, h)),
            f"{p}.mlp.down_proj.weight": ("F32", (h, i)),
            f"{p}.input_layernorm.weight": ("F32", (h,)),
        }
    return ModelHeader(g, tensors, "by hand")


def h_kv(g: dict) -> int:
    return g["num_key_value_heads"] * g["hidden_size"] // g["num_attention_heads"]


# --------------------------------------------------------------------------- headers and counts
@pytest.mark.parametrize("tied", [False, True])
def test_header_counts_the_parameters_of_the_saved_model(tmp_path, tied):
    model = build_pico_llama(vocab_size=50, seed=0)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model.save_pretrained(tmp_path)
    header = find_model_header(str(tmp_path))
    assert header.n_parameters == sum(p.numel() for p in model.parameters())  # ties: once
    assert set(header.tensors) == set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
    blob = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert header.nbytes == len(blob) - 8 - n  # the weights' bytes: the file less its header


@pytest.mark.parametrize("repo", sorted(PUBLISHED))
def test_fixture_matches_the_published_size_and_its_config(repo):
    """The committed headers hold the published parameter count (within 1%) and exactly the
    model transformers builds from the fixture's config on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    header = find_model_header(repo)
    assert header.origin == str(HEADER_DIR / repo)
    assert abs(header.n_parameters / PUBLISHED[repo] - 1) < 0.01
    cfg = AutoConfig.from_pretrained(HEADER_DIR / repo)
    auto = AutoModelForImageTextToText if hasattr(cfg, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(cfg)
    assert header.n_parameters == sum(p.numel() for p in model.parameters())
    assert header.dtype == "BF16" and header.nbytes == 2 * header.n_parameters
    vision = sum(p.numel() for n, p in model.named_parameters() if "visual" in n)
    assert header.n_vision_parameters == vision


class _RangeServer(http.server.BaseHTTPRequestHandler):
    """Serves ``folder`` at /<repo>/resolve/main/<file>, honouring ``Range`` (206), counting
    the bytes it sends."""

    folder: Path
    sent: dict

    def do_GET(self):
        name = self.path.split("/resolve/main/", 1)[-1]
        path = self.folder / name
        if not path.is_file():
            self.send_response(404)
            self.end_headers()
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        if rng:
            first, last = map(int, rng.removeprefix("bytes=").split("-"))
            data = data[first : last + 1]
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.sent[name] = self.sent.get(name, 0) + len(data)

    def log_message(self, *args):
        pass


def test_hub_headers_come_from_range_requests_not_the_weights(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")  # several shards + an index
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 1
    handler = type("H", (_RangeServer,), {"folder": tmp_path / "m", "sent": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        header = fetch_hub_header("org/tiny", endpoint=endpoint)
    finally:
        server.shutdown()
    local = read_header_dir(tmp_path / "m")
    assert header.tensors == local.tensors and header.config == local.config
    assert header.n_parameters == sum(p.numel() for p in model.parameters())
    for shard in shards:  # only the 8 length bytes and the JSON header of each shard
        (n,) = struct.unpack("<Q", shard.read_bytes()[:8])
        assert handler.sent[shard.name] == 8 + n < shard.stat().st_size


def test_single_file_model_on_the_hub_and_unreachable_hub(tmp_path):
    build_pico_llama(vocab_size=40).save_pretrained(tmp_path / "m")
    handler = type("H", (_RangeServer,), {"folder": tmp_path / "m", "sent": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:  # no index: a 404, then model.safetensors
        header = fetch_hub_header(
            "org/one", endpoint=f"http://127.0.0.1:{server.server_address[1]}"
        )
    finally:
        server.shutdown()
    assert header.tensors == read_header_dir(tmp_path / "m").tensors
    with pytest.raises(FileNotFoundError, match="could not be read from http://127.0.0.1:9"):
        fetch_hub_header("org/one", endpoint="http://127.0.0.1:9")


# ------------------------------------------------------------------------------------ formulas
def test_memory_terms_by_hand():
    hd = _header()
    n = hd.n_parameters
    # 2 x embed/head 10x8 + 2 layers x (q 64 + k 32 + v 32 + o 64 + 3 x 128 + norm 8)
    assert n == 2 * 80 + 2 * (64 + 32 + 32 + 64 + 384 + 8)
    tokens = 6
    per_layer_fp32 = 4 * (6 * 8 + 3 * 4 + 4 * 16) + 4 * 4 * 8  # a(6h+3kv+4I) + 4·4h
    act = tokens * (2 * per_layer_fp32 + LOGIT_BYTES * 10)
    assert activation_bytes(hd, tokens, 4, 4, False) == act
    gc = tokens * (4 * 8 * 2 + per_layer_fp32 + LOGIT_BYTES * 10)  # inputs + one layer
    assert activation_bytes(hd, tokens, 4, 4, True) == gc
    m = training_memory(hd, tokens=tokens, mixed=False)
    assert (m.weights, m.gradients, m.optimizer, m.extra) == (4 * n, 4 * n, 8 * n, 0)
    assert m.total == 16 * n + act
    mixed = training_memory(hd, tokens=tokens, mixed=True)
    assert mixed.extra == 2 * n  # autocast's 16-bit copies
    ddp = training_memory(hd, tokens=tokens, mixed=False, procs=4, distributed="ddp")
    assert ddp.extra == 4 * n and ddp.optimizer == 8 * n  # buckets; nothing sharded
    fsdp = training_memory(hd, tokens=tokens, mixed=False, procs=4, distributed="fsdp")
    block = 64 + 32 + 32 + 64 + 384 + 8
    assert (fsdp.weights, fsdp.optimizer, fsdp.extra) == (n, 2 * n, 2 * 4 * block)
    # LoRA r=2 on every linear but the head: r·(in+out) per weight
    per_layer = 2 * ((8 + 8) + (8 + 4) * 2 + (8 + 8) + (8 + 16) * 3)
    assert lora_parameters(hd, 2) == 2 * per_layer
    assert lora_parameters(hd, 2, ["q_proj"]) == 2 * 2 * (8 + 8)
    lora = training_memory(hd, tokens=tokens, mixed=False, lora_r=2)
    p = 2 * per_layer
    assert (lora.weights, lora.gradients, lora.optimizer) == (4 * (n + p), 4 * p, 8 * p)
    g = gradient_stage_memory(hd, tokens=tokens, dtype_bytes=2, checkpointing=False)
    assert (g.weights, g.gradients) == (2 * n, 2 * n)


def test_activation_formula_against_the_measured_gpu_peaks():
    """The gradient stage's plain fwd+bwd peak on the H100 (bf16, 8,192-token micro-batches):
    the formula within 10% of `make bench-gpu`'s measured peaks."""
    results = json.loads((ROOT / "benchmarks" / "results_gpu.json").read_text())
    for size in ("0.5b", "1.5b"):
        entry = results["sizes"][size]
        c = entry["config"]
        hd = ModelHeader(c, {"w": ("BF16", (entry["parameters"],))}, "bench")
        tokens = entry["bf16"]["micro_batching"]["tokens"]
        m = gradient_stage_memory(hd, tokens=tokens, dtype_bytes=2, checkpointing=False)
        measured = entry["bf16"]["peak_bytes"]["plain"]
        assert abs(m.total / measured - 1) < 0.10, (size, m.total / measured)


def test_throughput_calibration_reproduces_the_benchmarks():
    results = json.loads((ROOT / "benchmarks" / "results_gpu.json").read_text())["sizes"]
    assert (
        tuple(
            (results[s]["parameters"], results[s]["bf16"]["plain"]["rate"])
            for s in ("0.5b", "1.5b")
        )
        == GPU_CALIBRATION
    )
    for n, rate in GPU_CALIBRATION:  # the hours of N·tokens at the calibrated MFU: tokens/rate
        tp = calibrated_throughput("gpu", n)
        assert tp.mfu == pytest.approx(6 * n * rate / H100_BF16_PEAK)
        assert 6 * n * 1e6 / tp.flops_per_s == pytest.approx(1e6 / rate)
    assert gpu_mfu(10**12) == gpu_mfu(GPU_CALIBRATION[1][0])  # the nearest size outside
    mid = gpu_mfu(int(math.sqrt(GPU_CALIBRATION[0][0] * GPU_CALIBRATION[1][0])))
    assert mid == pytest.approx((gpu_mfu(10**6) + gpu_mfu(10**12)) / 2)
    cpu = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    raw = next(r["raw"] for r in cpu["results"] if r["bench"] == "gradients")
    assert (raw["parameters"], raw["tokens"] / raw["plain_fwd_bwd_s"]) == CPU_CALIBRATION


def test_training_runs_and_stage_flops_by_hand():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    runs = training_runs(cfg, 32)
    assert [(r.name, r.branches, r.epochs) for r in runs] == [
        ("ep1-s0", 1, 1.0),
        ("ep2-s0", 1, 2.0),
        ("random-k4", 4, 1.0),
        ("merit-1d", 2, 1.0),
        ("merit-2d", 4, 1.0),  # partition.json: the config's r = 2
        ("merit-3d", 8, 1.0),
        ("gain-k4", 4, 1.0),
    ]
    seeds = RunConfig.from_dict(
        {
            "train": {"seeds": [1]},
            "experiments": [
                {"name": "j", "kind": "joint"},
                {"name": "soup", "kind": "soup", "seeds": [0, 1, 2]},
                {"name": "m", "method": "balanced", "r": 5},
            ],
        }
    )
    names = [(r.name, r.branches) for r in training_runs(seeds, 8)]
    # joint at seeds 0 and 1 once each (the soup shares them), K capped at the 8 sources
    assert names == [("ep1-s0", 1), ("ep1-s1", 1), ("ep1-s2", 1), ("m", 8), ("m@s1", 8)]
    hd = _header()
    cfg = RunConfig.from_dict(
        {
            "experiments": [{"name": "j", "kind": "joint", "epochs": 2}],
            "plan": {
                "sources": 3,
                "examples_per_source": 100,
                "tokens_per_example": 50,
                "response_tokens_per_example": 10,
            },
            "calibration": {"n": 20},
            "mixture": {"path": "elsewhere", "eval_fraction": 0.1},
        }
    )
    sizes = stated_sizes(cfg)
    assert sizes.total("n_train") == 270 and sizes.total("train_tokens") == 270 * 50
    plan = plan_run(cfg, hd, sizes, device="gpu", mfu=0.5, peak=1e12)
    grad = next(s for s in plan.stages if s.stage.startswith("gradients"))
    train = next(s for s in plan.stages if s.stage.startswith("train joint, 2 epochs"))
    assert grad.flops == 6 * hd.n_parameters * 3 * 20 * 50
    assert train.flops == 6 * hd.n_parameters * 2 * 270 * 50
    assert train.hours == pytest.approx(train.flops / 0.5e12 / 3600)
    # the gradient stage: micro-batches of 16 examples padded to the longest (50 tokens)
    assert grad.memory.activations == activation_bytes(hd, 16 * 50, 4, 4, False)
    assert train.memory.activations == activation_bytes(hd, 32 * 50, 4, 4, False)


# -------------------------------------------------------------------------------- disk, a run
def test_disk_against_a_tiny_saved_run(tmp_path, one_thread):
    from merit_lab.pipeline import run_pipeline
    from tests.conftest import write_demo_slice, write_tiny_run_config

    sources = ["reverse-a-terse-lower", "shift-a-terse-upper", "rotate-b-verbose-lower"]
    data = write_demo_slice(tmp_path / "d", sources, {"train": 8, "calibration": 8, "eval": 2})
    cfg = load_config(write_tiny_run_config(tmp_path / "c.yaml", data, tmp_path / "runs"))
    run = run_pipeline(cfg, until="merge").root
    header = find_model_header(cfg.model)
    sizes = sizes_from_record(json.loads((run / "mixture.json").read_text()), cfg, "run")
    plan = plan_run(cfg, header, sizes, device="cpu")
    disk = {what.split(":")[0]: b for what, b, _ in plan.disk}

    def weights(folder: Path) -> int:  # safetensors data bytes, less each file's header
        total = 0
        for f in folder.rglob("*.safetensors"):
            blob = f.read_bytes()
            total += len(blob) - 8 - struct.unpack("<Q", blob[:8])[0]
        return total

    finals = [p / "final" for p in (run / "joint").iterdir()]
    finals += [p / "final" for p in (run / "branches" / "merit-1d").iterdir() if p.is_dir()]
    assert len(finals) == 3
    assert disk["final weights"] == sum(weights(f) for f in finals)
    assert disk["merged rows"] == weights(run / "merged")  # no controls here
    bank = run / "gradients"
    actual = sum(f.stat().st_size for f in bank.rglob("*.safetensors"))
    assert disk["gradient bank"] <= actual < disk["gradient bank"] * 1.01  # + small headers
    # the local mixture tokenised now gives the mixture stage's own counts
    counted = find_mixture_sizes(cfg)
    assert counted.basis.startswith("counted now")
    for name in ("n_train", "n_eval", "train_tokens", "train_response_tokens"):
        assert counted.total(name) == sizes.total(name), name
    record = json.loads((run / "mixture.json").read_text())
    assert counted.longest == max(n for s in record["sources"] for n in s["train_example_tokens"])


def test_checkpoint_bytes_of_a_trained_branch(tmp_path, one_thread):
    """A Trainer checkpoint holds fp32 weights (4 B/param) and AdamW's moments (8 B/param)."""
    from merit_lab.training.spec import BranchSpec
    from merit_lab.training.trainer import train_branch
    from tests.conftest import write_pico_branch_assets

    base, mix = write_pico_branch_assets(tmp_path, n=8)
    spec = BranchSpec(
        name="b",
        base_model=str(base),
        output_dir=str(tmp_path / "b"),
        sources=("add",),
        mixture={"path": str(mix), "calibration_n": 2, "eval_fraction": 0.0},
        train=TrainConfig(batch_size=4, save_steps=1),
        keep_checkpoints=True,
        device="cpu",
    )
    train_branch(spec)
    ckpt = sorted((tmp_path / "b" / "checkpoints").glob("checkpoint-*"))[-1]
    n = find_model_header(str(base)).n_parameters
    blob = (ckpt / "model.safetensors").read_bytes()
    assert len(blob) - 8 - struct.unpack("<Q", blob[:8])[0] == 4 * n
    optimizer = (ckpt / "optimizer.pt").stat().st_size
    assert 8 * n <= optimizer < 8 * n + 64 * 1024  # the moments, plus the pickle's framing


# ------------------------------------------------------------------------- the command, errors
def _paper_config(tmp_path: Path, model: str, **plan) -> Path:
    cfg = {
        "name": "paper-check",
        "model": model,
        "mixture": {"path": str(tmp_path / "not-fetched")},
        "dtype": "bfloat16",
        "device": "cuda",
        "train": {"batch_size": 16, "max_length": 2048, "launcher": "slurm", "slurm": {}},
        "plan": {
            "sources": 136,
            "examples_per_source": 1000,
            "tokens_per_example": 400,
            "response_tokens_per_example": 40,
        }
        | plan,
    }
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_plan_prints_the_3b_tables_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _paper_config(tmp_path, "Qwen/Qwen2.5-VL-3B-Instruct", image_tokens_per_example=256)
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3,754,622,976 parameters" in out and "data/model-headers/Qwen" in out
    assert "stated in the config (plan:)" in out and "does not fit" in out
    assert "FSDP over" in out and "SLURM" in out and "array of 20: " in out
    assert "the longest job: ep2-s0, " in out and "(timeout_min=1440)" in out
    cfg = load_config(path)
    plan = plan_run(cfg, find_model_header(cfg.model), stated_sizes(cfg))
    assert format_plan(plan) == out.rstrip("\n")


def test_the_advice_names_the_largest_micro_batch_that_fits(tmp_path, monkeypatch):
    from merit_lab.training.footprint import ExampleShape, branch_memory

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(_paper_config(tmp_path, "Qwen/Qwen2.5-3B", tokens_per_example=2048))
    header = find_model_header(cfg.model)
    plan = plan_run(cfg, header, stated_sizes(cfg))
    shape = ExampleShape(2048)

    def total(batch: int) -> float:
        return branch_memory(
            cfg, header, "gpu", lora=0, gc=True, procs=1, dist="ddp", shape=shape, batch=batch
        ).total

    assert plan.recommendation[0].startswith("does not fit") and total(16) > 80e9
    line = next(x for x in plan.recommendation if "smaller micro-batch" in x)
    b = int(line.split("batch_size: ")[1].split(",")[0])
    assert total(b) <= 80e9 < total(2 * b) and f"{total(b) / 1e9:.1f} GB" in line
    assert f"grad_accum: {16 // b}," in line  # the global batch of 16 kept


def test_slurm_jobs_are_the_launchers_own(tmp_path):
    cfg = RunConfig.from_dict(
        {"train": {"launcher": "slurm", "procs_per_branch": 2, "slurm": {"gpus_per_node": 1}}}
    )
    arrays = slurm_jobs(training_runs(cfg, 16), dict(cfg.train.slurm), 2)
    assert len(arrays) == 1
    params = arrays[0]["parameters"]
    assert params["gpus_per_node"] == 2 and params["tasks_per_node"] == 2  # width 2
    assert params["name"] == "merit-branch" and params["timeout_min"] == 24 * 60
    assert arrays[0]["jobs"][:3] == ["branch 'ep1-s0'", "branch 'ep2-s0'", "branch 'random-k4/0'"]
    assert len(arrays[0]["jobs"]) == 2 + 4 + 2 + 4 + 8


def test_a_model_with_no_config_and_no_fixture_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    (tmp_path / "empty").mkdir()
    for model, says in [
        (str(tmp_path / "empty"), "has no config.json"),
        ("nobody/no-such-model", "no fixture in"),
    ]:
        assert main(["plan", str(_paper_config(tmp_path, model))]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and err[0].startswith("merit-lab: error:")


def test_a_mixture_that_is_not_here_needs_a_stated_size(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "mixture": str(tmp_path / "nothing")}))
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is not here, and the config states no size: add a plan: section" in err
    with pytest.raises(ValueError, match="together"):
        RunConfig.from_dict({"plan": {"sources": 3}})


@pytest.mark.parametrize("name", ["paper-vl-3b", "paper-text-3b"])
def test_the_paper_configs_print_offline(name, capsys, monkeypatch):
    path = ROOT / "configs" / f"{name}.yaml"
    if not path.is_file():
        pytest.skip(f"{path} is not written yet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "header from data/model-headers/Qwen/" in out and "\ntotal " in out


def test_bench_plan_compares_the_gpu_shapes():
    """`python -m benchmarks.bench_plan`'s GPU part (it reads results_gpu.json, trains nothing):
    a time, memory and merge factor per size, the memory ones within 10%."""
    from benchmarks import bench_plan
    from benchmarks.common import Results

    res = Results("plan")
    bench_plan.compare_gpu(res)
    names = [(f.section, f.name.split(",")[0]) for f in res.figures]
    assert len(names) == 10 and ("bench-gpu 1.5b", "merge time") in names
    memory = [f.value for f in res.figures if "peak memory" in f.name]
    assert len(memory) == 4 and all(0.9 < v < 1.1 for v in memory)
