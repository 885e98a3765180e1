"""The gradient stage at scale: sources sharded across workers, token micro-batches, gradient
checkpointing, half precision summed in float32, parameter presets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from merit_lab.config.schema import load_config
from merit_lab.data.mixture import load_mixture
from merit_lab.envelope import EnvelopeError
from merit_lab.gradients.bank import GradientBank
from merit_lab.gradients.batching import micro_batches
from merit_lab.gradients.estimate import estimate_gradients
from merit_lab.gradients.sketch import SketchSpec
from merit_lab.gradients.workers import (
    GradientJob,
    job_paths,
    launch_jobs,
    read_done,
    shard_sources,
)
from merit_lab.models.loading import build_pico_llama, load_model, select_parameters
from merit_lab.pipeline import run_pipeline

EXACT = SketchSpec(kind="exact")
SKETCH = SketchSpec(dim=4096, seed=3)


@pytest.fixture(scope="module")
def demo6():
    m = load_mixture("demo", calibration_n=16)
    return m.select(m.names[:6])


def test_shard_sources_balances_cost_and_keeps_order():
    costs = {"a": 10, "b": 1, "c": 6, "d": 5, "e": 1}
    shards = shard_sources(list("abcde"), costs, 2)
    # longest first onto the least loaded: a→0, c→1, d→1, b→0, e→0  (loads 12 and 11)
    assert shards == [["a", "b", "e"], ["c", "d"]]
    assert shard_sources(list("ab"), {}, 5) == [["a"], ["b"]]  # no empty shard
    with pytest.raises(ValueError, match="workers"):
        shard_sources(["a"], {}, 0)


def test_job_file_is_enveloped_and_a_legacy_one_still_loads(tmp_path):
    """A job file carries the header over its fields; a newer version, another format or an
    unknown field is refused naming the file; a job from before the envelope still loads."""
    job = GradientJob(worker=1, model="/m", out_dir="/o", sources=("a", "b"), n=8)
    path = job.save(tmp_path / "1.job.json")
    doc = json.loads(path.read_text())
    assert list(doc)[:2] == ["format", "version"]
    assert (doc["format"], doc["version"]) == ("merit-lab/gradient-job", 1)
    assert doc["sources"] == ["a", "b"] and doc["n"] == 8 and doc["worker"] == 1
    assert GradientJob.load(path) == job
    cases = [
        (
            {**doc, "version": 2},
            "1.job.json: merit-lab/gradient-job version 2 is not one",
            EnvelopeError,
        ),
        (
            {**doc, "format": "merit-lab/gradient-bank"},
            "holds 'merit-lab/gradient-bank'",
            EnvelopeError,
        ),
        ({**doc, "sauce": 1}, r"1.job.json: unknown gradient-job fields \['sauce'\]", ValueError),
    ]
    for bad, match, error in cases:
        path.write_text(json.dumps(bad))
        with pytest.raises(error, match=match):
            GradientJob.load(path)
    path.write_text(json.dumps({k: v for k, v in doc.items() if k not in ("format", "version")}))
    assert GradientJob.load(path) == job
    # the done record beside it: the same rules
    done = {"worker": 1, "sources": ["a"], "info": {"key": "k"}, "throughput": {}}
    path.write_text(json.dumps(done))
    assert read_done(path) == done
    path.write_text(json.dumps({"format": "merit-lab/gradient-worker-done", "version": 2}))
    with pytest.raises(EnvelopeError, match="gradient-worker-done version 2 is not one"):
        read_done(path)


def test_token_micro_batches_pack_longest_first_and_change_no_gradient(
    pico_model, demo_tokenizer, demo6
):
    from merit_lab.data.formatting import tokenize_examples

    ex = tokenize_examples(demo_tokenizer, demo6[demo6.names[0]].calibration, 256, limit=16)
    batches = micro_batches(ex, tokens=200)
    assert sorted(id(e) for b in batches for e in b) == sorted(id(e) for e in ex)
    for b in batches:  # within budget, or one example alone
        assert len(b) == 1 or len(b) * max(e.n_tokens for e in b) <= 200
    assert [b[0].n_tokens for b in batches] == sorted(
        (b[0].n_tokens for b in batches), reverse=True
    )
    kw = dict(sketch=EXACT, n=16, progress=False)
    by_examples = estimate_gradients(pico_model, demo_tokenizer, demo6, micro_batch_size=16, **kw)
    by_tokens = estimate_gradients(pico_model, demo_tokenizer, demo6, micro_batch_tokens=200, **kw)
    np.testing.assert_allclose(by_tokens.rows, by_examples.rows, rtol=1e-4, atol=1e-7)
    assert by_tokens.info["key"] == by_examples.info["key"]  # the rows do not depend on it


def test_gradient_checkpointing_gives_the_same_gradient(demo_tokenizer, demo6):
    model = build_pico_llama(vocab_size=len(demo_tokenizer), seed=1)
    kw = dict(sketch=EXACT, n=16, micro_batch_size=8, progress=False)
    plain = estimate_gradients(model, demo_tokenizer, demo6, **kw)
    ckpt = estimate_gradients(model, demo_tokenizer, demo6, gradient_checkpointing=True, **kw)
    np.testing.assert_allclose(ckpt.rows, plain.rows, rtol=1e-5, atol=1e-8)
    # checkpointing is switched off again and the model left in eval mode
    assert not model.training and not any(getattr(m, "training", False) for m in model.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_half_precision_banks_stay_close_to_exact_fp32(demo_tokenizer, demo6):
    """A bf16 model's bank (its gradient sketched into float32 rows) stays close to the exact
    fp32 bank, and is keyed apart from it."""
    fp32 = load_model("demo", device="cpu")
    bf16 = load_model("demo", device="cpu", dtype="bfloat16")
    kw = dict(n=16, micro_batch_size=4, progress=False)
    exact = estimate_gradients(fp32, demo_tokenizer, demo6, sketch=EXACT, **kw)
    half = estimate_gradients(bf16, demo_tokenizer, demo6, sketch=EXACT, **kw)
    assert half.info["dtype"] == "bfloat16" and half.info["key"] != exact.info["key"]
    assert half.rows.dtype == np.float32

    def cos(rows):
        u = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        return (u @ u.T)[np.triu_indices(len(rows), 1)]

    # 0.010 here; 0.079 over the demo's 120 pairs at n = 200 (benchmarks/bench_precision.py)
    assert np.abs(cos(half.rows) - cos(exact.rows)).max() < 0.03


def test_parameter_presets_select_by_module(pico_model):
    names = lambda preset: [n for n, _ in select_parameters(pico_model, preset=preset)]  # noqa: E731
    assert all(".self_attn." in n for n in names("attention"))
    assert all(".mlp." in n for n in names("mlp"))
    assert names("language") == names("all")
    last = names("last-1")
    assert last and all(n.startswith("model.layers.1.") for n in last)  # pico: 2 layers
    assert set(names("last-2")) == {n for n in names("all") if ".layers." in n}
    with pytest.raises(ValueError, match="preset 'vision'.*selects nothing"):
        select_parameters(pico_model, preset="vision")


def _one_thread_bank(mix, sources):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: CPU kernels sum in thread-sized blocks
    try:
        model = load_model("demo", device="cpu")
        return estimate_gradients(
            model,
            load_tokenizer_demo(),
            mix.select(sources),
            sketch=SKETCH,
            n=16,
            micro_batch_size=8,
            progress=False,
        )
    finally:
        torch.set_num_threads(n)


def load_tokenizer_demo():
    from merit_lab.models.loading import load_tokenizer

    return load_tokenizer("demo")


def _jobs(tmp_path: Path, shards, **extra) -> list[Path]:
    from merit_lab.demo import DEMO_DIR

    paths = []
    for i, shard in enumerate(shards):
        job = GradientJob(
            worker=i,
            model=str(DEMO_DIR / "base"),
            out_dir=str(tmp_path / "bank"),
            sources=tuple(shard),
            mixture={"path": "demo", "calibration_n": 16},
            sketch=SKETCH.to_dict(),
            n=16,
            micro_batch_size=8,
            device="cpu",
            **extra,
        )
        paths.append(job.save(job_paths(job.out_dir, i)[0]))
    return paths


def test_two_workers_equal_one_process_bitwise(tmp_path, demo6, monkeypatch):
    from merit_lab.gradients.workers import agreed_info, assemble_bank

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    names = list(demo6.names)
    shards = shard_sources(names, {}, 2)
    dones = launch_jobs(_jobs(tmp_path, shards), mode="local", n_procs=2)
    assert [d["sources"] for d in dones] == shards
    done_file = json.loads(job_paths(tmp_path / "bank", 0)[1].read_text())
    assert (done_file["format"], done_file["version"]) == ("merit-lab/gradient-worker-done", 1)
    info = agreed_info(dones)
    bank = assemble_bank(tmp_path / "bank", names, info, {})
    ref = _one_thread_bank(demo6, names)
    assert bank.info["key"] == ref.info["key"]
    assert np.array_equal(bank.rows, ref.rows)  # bitwise: a row depends on nothing but its source
    assert all(d["throughput"]["tokens_per_s"] > 0 for d in dones)


def test_a_failed_worker_is_named_with_its_log(tmp_path, monkeypatch):
    from merit_lab.jobs import JobFailedError

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    paths = _jobs(tmp_path, [["no-such-source"]])
    msg = r"(?s)gradient worker 0 failed.*no source named .no-such-source"
    with pytest.raises(JobFailedError, match=msg):
        launch_jobs(paths, mode="local", n_procs=1)


def _run_config(tmp_path: Path, sources: list[str], workers: int) -> Path:
    from tests.conftest import write_demo_slice

    mix = tmp_path / "mix"
    if mix.exists():
        import shutil

        shutil.rmtree(mix)
    write_demo_slice(mix, sources, {"train": 24, "calibration": 12, "eval": 4})
    cfg = {
        "name": "w",
        "model": "demo",
        "mixture": str(mix),
        "output_dir": str(tmp_path / "runs"),
        "device": "cpu",
        "calibration": {"n": 12, "micro_batch_size": 6, "workers": workers},
        "sketch": {"dim": 4096, "seed": 0},
        "partition": {"r": 1},
        "experiments": [{"name": "joint-1ep", "kind": "joint"}],
    }
    path = tmp_path / f"cfg{workers}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _done_sources(run_dir: Path) -> list[str]:
    return sorted(
        s
        for p in (run_dir / "gradients/workers").glob("*.done.json")
        for s in json.loads(p.read_text())["sources"]
    )


@pytest.mark.slow  # the slow tier: worker processes killed and the pipeline resumed, end to end
def test_pipeline_workers_kill_resume_and_added_sources(tmp_path, monkeypatch):
    """Two workers through the runner: the bank equals one process's; a killed worker's
    sources are redone alone; a source added later is the only one computed."""
    from merit_lab.demo import DEMO_DIR

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    all_names = sorted(json.loads((DEMO_DIR / "sources.json").read_text())["sources"])[:5]
    four = all_names[:4]
    cfg_path = _run_config(tmp_path, four, workers=2)
    run_dir = tmp_path / "runs" / "w"
    # a worker killed in the middle: start the runner, SIGKILL its process group once 2 parts exist
    cmd = [sys.executable, "-m", "merit_lab.cli", "run", str(cfg_path), "--until", "gradients"]
    env = {**os.environ, "PYTHONPATH": "."}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, **quiet)
    deadline = time.time() + 120
    while not list((run_dir / "gradients/parts").glob("*.safetensors")):
        assert proc.poll() is None and time.time() < deadline, "runner ended before a part"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((run_dir / "gradients/parts").glob("*.safetensors")))
    assert not (run_dir / "gradients/bank.json").exists()
    run_pipeline(load_config(cfg_path), until="gradients")
    two = GradientBank.load(run_dir / "gradients")
    assert two.info["throughput"]["sources"] == 4 - finished  # only the unfinished ones

    # the same bank from one process (same thread count)
    one_cfg = load_config(_run_config(tmp_path / "one", four, workers=1))
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = GradientBank.load(run_pipeline(one_cfg, until="gradients").gradients)
    finally:
        torch.set_num_threads(torch_threads)
    assert np.array_equal(two.rows, one.rows)

    # a fifth source: only it is computed
    cfg5 = load_config(_run_config(tmp_path, all_names, workers=2))
    run_pipeline(cfg5, until="gradients")
    assert _done_sources(run_dir) == [all_names[4]]
    five = GradientBank.load(run_dir / "gradients")
    assert five.names == tuple(all_names) and np.array_equal(five.rows[:4], one.rows)

    # another dtype: no part of the float32 bank is reused
    cfg_bf16 = load_config(_run_config(tmp_path, all_names, workers=2), dtype="bfloat16")
    run_pipeline(cfg_bf16, until="gradients")
    half = GradientBank.load(run_dir / "gradients")
    assert half.info["dtype"] == "bfloat16" and half.info["throughput"]["sources"] == 5
