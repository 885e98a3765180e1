"""One branch trained by 2 CPU processes (torchrun over gloo): same weights and token budget as one
process, kill-and-relaunch, a resume at another process count, gradient checkpointing, refusals.

Tolerance: float32 weights within atol 1e-6, rtol 1e-5 of the one-process run (measured: at most
1.2e-7 apart, one float32 ulp at these magnitudes; the two runs sum the same per-example gradients
in another order, through an all-reduce).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from merit_lab.data.formatting import TokenizedExample
from merit_lab.training.branch_log import branch_status, read_log
from merit_lab.training.distributed import (
    NULL_EXAMPLE,
    collate_with_nulls,
    null_padding,
    process_training_args,
    split_global_batch,
    torchrun_command,
)
from merit_lab.training.launch import launch_branches
from merit_lab.training.spec import BranchSpec, write_spec
from merit_lab.training.trainer import train_branch
from tests.conftest import write_pico_branch_assets

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TOL = {"atol": 1e-6, "rtol": 1e-5}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    """A pico Llama θ0 with the demo tokenizer, and a 2-source mixture of 24 examples each."""
    return write_pico_branch_assets(tmp_path_factory.mktemp("dist_assets"))


def make_spec(assets, out: Path, **kw) -> BranchSpec:
    """66 examples (1.5 epochs of 44), 8 per optimizer step: 9 steps, the last one short, so
    2 processes need 6 null examples to end in step."""
    base, mix = assets
    defaults = dict(
        name=out.name,
        base_model=str(base),
        output_dir=str(out),
        sources=("add", "max"),
        mixture={"path": str(mix), "eval_fraction": 0.1, "seed": 0, "calibration_n": 4},
        epochs=1.5,
        lr=1e-2,
        batch_size=4,
        grad_accum=2,
        warmup_ratio=0.1,
        max_length=64,
        device="cpu",
        dtype="float32",
        save_steps=3,
    )
    return BranchSpec.from_dict({**defaults, **kw})


def weights(final: Path) -> dict[str, torch.Tensor]:
    return load_file(final / "model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL)


def manifest(final: Path) -> dict:
    return json.loads((final / "merit_branch.json").read_text())


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory) -> dict[str, Path]:
    """The same branch trained by one process (in-process) and by two (torchrun, launched by
    the sequential launcher)."""
    root = tmp_path_factory.mktemp("dist_runs")
    one = train_branch(make_spec(assets, root / "one"))
    [two] = launch_branches([make_spec(assets, root / "two", procs_per_branch=2)])
    return {"one": one, "two": two}


def test_global_batch_split_and_refusal(tmp_path, assets):
    assert split_global_batch(4, 2, 1) == (4, 2)
    assert split_global_batch(4, 2, 2) == (4, 1)  # accumulation divided first
    assert split_global_batch(4, 1, 2) == (2, 1)  # else the micro-batch
    assert split_global_batch(2, 6, 3) == (2, 2)
    assert null_padding(66, 4, 2) == 6 and null_padding(64, 4, 2) == 0
    assert null_padding(66, 4, 1) == 0
    batch = collate_with_nulls([TokenizedExample((5, 6, 7), (-100, 6, 7)), NULL_EXAMPLE], 0)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 0]]  # no token counted
    assert batch["labels"][1].tolist() == [-100] * 3  # no loss
    with pytest.raises(ValueError, match=r"branch 'b': procs_per_branch=2 divides neither"):
        split_global_batch(3, 3, 2, "b")
    # the config itself refuses it, so a run meets it at load, before any stage
    with pytest.raises(ValueError, match=r"procs_per_branch: 2 divides neither grad_accum=3 nor"):
        make_spec(assets, tmp_path / "b", batch_size=3, grad_accum=3, procs_per_branch=2)
    assert not (tmp_path / "b").exists()  # refused before any work
    with pytest.raises(ValueError, match="distributed: unknown distributed mode 'zero3'"):
        make_spec(assets, tmp_path / "b", distributed="zero3")
    cmd = torchrun_command("s.json", 2)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[3:] == [
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "merit_lab.training.trainer",
        "s.json",
    ]


def test_backend_and_fsdp_refused_on_cpu(monkeypatch):
    assert process_training_args("cpu", "ddp", False) == {}  # one process: nothing to add
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert process_training_args("cpu", "ddp", False) == {"ddp_backend": "gloo"}
    assert process_training_args("cuda", "ddp", False) == {"ddp_backend": "nccl"}
    fsdp = process_training_args("cuda", "fsdp", False)
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"]["version"] == 2
    with pytest.raises(ValueError, match="fsdp.*needs GPUs"):
        process_training_args("cpu", "fsdp", False)


def test_spec_fields_and_which_changes_resume(tmp_path, assets):
    spec = make_spec(assets, tmp_path / "b")
    assert {"procs_per_branch", "distributed", "gradient_checkpointing"}.isdisjoint(
        spec.to_dict()
    )  # absent at their defaults: older spec.json files stay equal
    two = make_spec(assets, tmp_path / "b", procs_per_branch=2, gradient_checkpointing=True)
    assert BranchSpec.load(two.save(tmp_path / "s.json")) == two
    write_spec(spec)
    write_spec(two)  # the process count and checkpointing may change between sessions
    with pytest.raises(ValueError, match=r"different branch.*distributed"):
        write_spec(make_spec(assets, tmp_path / "b", procs_per_branch=2, distributed="fsdp"))
    fsdp = make_spec(assets, tmp_path / "f", procs_per_branch=2, distributed="fsdp")
    write_spec(fsdp)
    with pytest.raises(ValueError, match="FSDP branch resumes with the 2 processes"):
        write_spec(make_spec(assets, tmp_path / "f", procs_per_branch=4, distributed="fsdp"))


def test_two_processes_train_what_one_does(runs):
    one, two = weights(runs["one"]), weights(runs["two"])
    diff = max_diff(one, two)
    assert diff <= 1e-6, diff
    assert_same_weights(one, two)
    m1, m2 = manifest(runs["one"]), manifest(runs["two"])
    assert (m1["procs"], m2["procs"]) == (1, 2)
    for key in ("tokens", "source_tokens", "examples", "steps", "response_tokens"):
        assert m1[key] == m2[key], key  # the token budget, nulls and all, is one process's
    assert m2["steps"] == 9 and m2["examples"] == 66
    assert m2["tokens_per_s"] > 0
    assert m2["spec"]["procs_per_branch"] == 2
    log1, log2 = (read_log(f.parent / "log.jsonl") for f in (runs["one"], runs["two"]))
    assert [r["step"] for r in log2] == list(range(1, 10))  # rank 0 alone wrote it
    assert [r["tokens"] for r in log1] == [r["tokens"] for r in log2]
    np.testing.assert_allclose([r["loss"] for r in log1], [r["loss"] for r in log2], rtol=1e-5)
    assert not (runs["two"].parent / "checkpoints").exists()
    assert "tok/s" in (runs["two"].parent / "train.log").read_text()  # the bar's rate


# Each process parks once the step after the first checkpoint is done and logged (before the next
# one begins; that step must be redone) and says so in a file: the parent kills on that event,
# not after a guessed time.
PARKED_TRAIN = """
import os, sys, time
from pathlib import Path
from transformers import TrainerCallback
from merit_lab.training.distributed import finish_process_group
from merit_lab.training.spec import BranchSpec
from merit_lab.training.trainer import train_branch

class ParkPastCheckpoint(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == args.save_steps + 1:
            Path(sys.argv[2], f"parked-{os.environ['RANK']}").write_text(str(state.global_step))
            while True:
                time.sleep(60)

train_branch(BranchSpec.load(sys.argv[1]), callbacks=[ParkPastCheckpoint()])
finish_process_group()
"""


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (each in a session of its own) at once: a lost node."""
    victims = [*psutil.Process(proc.pid).children(recursive=True)]
    for p in victims:
        p.send_signal(signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(victims, timeout=10)


@pytest.mark.slow  # the slow tier: a 2-process gloo job killed and relaunched
def test_kill_and_relaunch_matches_uninterrupted_run(tmp_path, assets, runs):
    spec = make_spec(assets, tmp_path / "killed", procs_per_branch=2)
    out = Path(spec.output_dir)
    path = write_spec(spec)
    script = tmp_path / "parked_train.py"
    script.write_text(PARKED_TRAIN)
    cmd = torchrun_command(path, 2)
    cmd[cmd.index("-m", 3) : cmd.index("-m", 3) + 2] = [str(script)]  # same launch, our script
    cmd.append(str(tmp_path))  # where the processes say they parked
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 1800  # a hang guard only
        while len(list(tmp_path.glob("parked-*"))) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the processes never reached step 4"
            time.sleep(0.05)
    finally:
        kill_tree(proc)
    assert not (out / "final").exists()
    assert [p.name for p in out.glob("checkpoints/checkpoint-*")] == ["checkpoint-3"]
    killed_at = branch_status(out)
    assert killed_at["state"] == "running" and killed_at["step"] == 4

    [final] = launch_branches([spec], mode="local")  # resumes from the last complete checkpoint
    assert_same_weights(weights(final), weights(runs["two"]))
    log, ref = read_log(out / "log.jsonl"), read_log(runs["two"].parent / "log.jsonl")
    assert [r["step"] for r in log] == [r["step"] for r in ref]  # no duplicated steps
    assert [r["tokens"] for r in log] == [r["tokens"] for r in ref]
    np.testing.assert_allclose([r["loss"] for r in log], [r["loss"] for r in ref], rtol=1e-5)
    m = manifest(final)
    assert (m["tokens"], m["steps"], m["procs"]) == (manifest(runs["two"])["tokens"], 9, 2)
    assert m["torch_threads"] == max(1, (os.cpu_count() or 1) // 2)  # one slot, 2 processes


class StopAt(TrainerCallback):
    """Ends a session right after the checkpoint of ``step`` (a kill, without the race)."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_with_another_process_count(tmp_path, assets, runs):
    out = tmp_path / "grown"
    with pytest.raises(RuntimeError, match="trained .* tokens, planned"):
        train_branch(make_spec(assets, out), callbacks=[StopAt(3)])  # 1 process, to step 3
    assert branch_status(out)["step"] == 3
    [final] = launch_branches([make_spec(assets, out, procs_per_branch=2)])  # 2 from step 3
    assert_same_weights(weights(final), weights(runs["one"]))
    assert [r["step"] for r in read_log(out / "log.jsonl")] == list(range(1, 10))
    assert manifest(final)["tokens"] == manifest(runs["one"])["tokens"]


def test_gradient_checkpointing_gives_the_same_weights(tmp_path, assets, runs):
    final = train_branch(make_spec(assets, tmp_path / "gc", gradient_checkpointing=True))
    assert_same_weights(weights(final), weights(runs["one"]))
    assert manifest(final)["spec"]["gradient_checkpointing"] is True


@pytest.mark.slow
def test_submitit_job_of_two_tasks_splitting_the_micro_batch(tmp_path, assets):
    # grad_accum 1: each of the 2 tasks takes 2 of the 4 examples of every micro-batch
    kw = dict(batch_size=4, grad_accum=1)
    ref = train_branch(make_spec(assets, tmp_path / "s1", **kw))
    spec = make_spec(assets, tmp_path / "s2", procs_per_branch=2, **kw)
    [final] = launch_branches(
        [spec],
        mode="slurm",
        slurm={"cluster": "local", "timeout_min": 10},
        executor_folder=tmp_path / "jobs",
    )
    assert manifest(final)["procs"] == 2
    assert manifest(final)["tokens"] == manifest(ref)["tokens"]
    assert_same_weights(weights(final), weights(ref))
    assert len(list((tmp_path / "jobs").glob("*_log.out"))) == 2  # one log per task
