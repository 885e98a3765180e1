"""Branch training: spec round trip, schedule, loss and token budget, kill-and-resume equality."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from merit_lab.data.formatting import tokenize_examples
from merit_lab.data.mixture import load_mixture
from merit_lab.models.checkpoints import fingerprint_checkpoint
from merit_lab.models.loading import load_tokenizer
from merit_lab.training.branch_log import branch_status
from merit_lab.training.spec import BranchSpec
from merit_lab.training.trainer import _last_complete_checkpoint, _schedule, train_branch
from tests.conftest import write_pico_branch_assets

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    """A pico Llama θ0 with the demo tokenizer, and a 2-source mixture of 24 examples each."""
    return write_pico_branch_assets(tmp_path_factory.mktemp("train_assets"))


def make_spec(assets, out: Path, **kw) -> BranchSpec:
    base, mix = assets
    defaults = dict(
        name=out.name,
        base_model=str(base),
        output_dir=str(out),
        sources=("add", "max"),
        mixture={"path": str(mix), "eval_fraction": 0.1, "seed": 0, "calibration_n": 4},
        lr=1e-2,
        batch_size=4,
        warmup_ratio=0.1,
        max_length=64,
        device="cpu",
        dtype="float32",
        save_steps=4,
    )
    return BranchSpec.from_dict({**defaults, **kw})


def train_tokens(assets, sources) -> dict[str, int]:
    """Each source's train-split tokens, computed independently of train.py."""
    base, mix = assets
    tok = load_tokenizer(base)
    mixture = load_mixture(mix, eval_fraction=0.1, seed=0, calibration_n=4)
    return {
        s: sum(t.n_tokens for t in tokenize_examples(tok, mixture[s].train, 64)) for s in sources
    }


def read_log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]


def test_spec_roundtrip_and_validation(tmp_path, assets):
    spec = make_spec(assets, tmp_path / "b", epochs=1.5, lr_scheduler="linear")
    assert BranchSpec.load(spec.save(tmp_path / "spec.json")) == spec
    with pytest.raises(ValueError, match="lr_scheduler"):
        make_spec(assets, tmp_path / "b", lr_scheduler="step")
    with pytest.raises(ValueError, match="unknown BranchSpec field"):
        BranchSpec.from_dict({**spec.to_dict(), "learning_rate": 1.0})
    assert branch_status(tmp_path / "b")["state"] == "pending"


def test_schedule_gives_each_source_the_same_budget_in_any_branch(tmp_path, assets):
    lengths = {"add": [0] * 10, "max": [0] * 7}
    joint = _schedule(make_spec(assets, tmp_path / "j", epochs=2.5), lengths)
    alone = _schedule(make_spec(assets, tmp_path / "a", epochs=2.5, sources=("add",)), lengths)
    assert len(joint) == 2 * 17 + 5 + 4  # round(0.5 * 10) + round(0.5 * 7)
    assert sorted(joint[:17]) == sorted(joint[17:34])  # whole epochs are permutations
    assert joint[:17] != joint[17:34]  # ... reshuffled each epoch
    assert sorted(p for p in joint if p[0] == "add") == sorted(alone)


def test_train_branch_end_to_end(tmp_path, assets, monkeypatch):
    spec = make_spec(assets, tmp_path / "b0", epochs=2)
    final = train_branch(spec)
    out = Path(spec.output_dir)
    assert final == out / "final"

    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, len(log) + 1))
    first, last = np.mean([r["loss"] for r in log[:3]]), np.mean([r["loss"] for r in log[-3:]])
    assert last < 0.7 * first, (first, last)
    assert log[-1]["epoch"] == pytest.approx(2.0)

    tokens = train_tokens(assets, spec.sources)
    manifest = json.loads((final / "merit_branch.json").read_text())
    assert manifest["base_fingerprint"] == fingerprint_checkpoint(assets[0])
    assert manifest["source_tokens"] == {s: 2 * n for s, n in tokens.items()}
    assert manifest["tokens"] == 2 * sum(tokens.values()) == log[-1]["tokens"]
    mix = load_mixture(assets[1], eval_fraction=0.1, seed=0, calibration_n=4)
    n_train = sum(len(mix[s].train) for s in spec.sources)
    assert manifest["examples"] == 2 * n_train
    assert manifest["steps"] == len(log) == math.ceil(2 * n_train / 4)
    assert manifest["tokens_per_s"] > 0

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final)
    base = load_file(assets[0] / "model.safetensors")
    delta = max((p - base[k]).abs().max().item() for k, p in model.state_dict().items())
    assert delta > 1e-3  # it trained
    assert sorted(p.name for p in final.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "checkpoints").exists()  # dropped once final/ is complete

    status = branch_status(out)
    assert status["state"] == "done" and status["step"] == status["total_steps"] == len(log)
    written = [final / "model.safetensors", out / "log.jsonl", out / "spec.json"]
    stamps = [p.stat().st_mtime_ns for p in written]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished branch was planned or trained again")

    monkeypatch.setattr("merit_lab.training.trainer._plan", no_training)
    monkeypatch.setattr("merit_lab.training.trainer._make_trainer", no_training)
    assert train_branch(spec) == final  # a finished branch is skipped: no plan, no step
    assert [p.stat().st_mtime_ns for p in written] == stamps


def test_refuses_a_folder_holding_another_branch(tmp_path, assets):
    make_spec(assets, tmp_path / "b").save(tmp_path / "b" / "spec.json")
    with pytest.raises(ValueError, match=r"different branch.*lr"):
        train_branch(make_spec(assets, tmp_path / "b", lr=1.0))


def test_a_checkpoint_cut_by_a_kill_is_skipped_and_removed(tmp_path):
    for step, state in ((3, "{}"), (6, '{"global_st'), (9, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert _last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    assert _last_complete_checkpoint(tmp_path / "none") is None


SLOW_TRAIN = """
import sys, time
import torch
from transformers import TrainerCallback
from merit_lab.training.spec import BranchSpec
from merit_lab.training.trainer import train_branch

class Slow(TrainerCallback):  # leaves time to kill it between checkpoints
    def on_step_end(self, *args, **kwargs):
        time.sleep(0.1)

torch.set_num_threads(1)
train_branch(BranchSpec.load(sys.argv[1]), callbacks=[Slow()])
"""


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, assets):
    # Gradient accumulation too: resuming must skip save_steps * grad_accum micro-batches.
    kw = dict(batch_size=2, grad_accum=2, save_steps=3)
    ref = make_spec(assets, tmp_path / "ref", **kw)
    spec = make_spec(assets, tmp_path / "killed", **kw)
    out = Path(spec.output_dir)
    out.mkdir()
    path = spec.save(out / "spec.json")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAIN, str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("checkpoints/checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.05)
        time.sleep(0.25)  # a step or two past the checkpoint, which must be redone
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (out / "final").exists()
    killed_at = branch_status(out)
    assert killed_at["state"] == "running" and 3 <= killed_at["step"] < killed_at["total_steps"]

    final = train_branch(spec)  # resumes from the last complete checkpoint
    ref_final = train_branch(ref)
    a, b = load_file(final / "model.safetensors"), load_file(ref_final / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)

    log, ref_log = read_log(out), read_log(Path(ref.output_dir))
    assert [r["step"] for r in log] == [r["step"] for r in ref_log]  # no duplicated steps
    np.testing.assert_allclose([r["loss"] for r in log], [r["loss"] for r in ref_log], rtol=1e-4)
    assert [r["tokens"] for r in log] == [r["tokens"] for r in ref_log]
    m, m_ref = (json.loads((f / "merit_branch.json").read_text()) for f in (final, ref_final))
    assert (m["tokens"], m["steps"]) == (m_ref["tokens"], m_ref["steps"])
