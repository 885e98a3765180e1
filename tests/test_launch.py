"""Branch launching: in-process, local subprocesses (n_procs=2), submitit's local executor."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from merit_lab.training.branch_log import branch_status
from merit_lab.training.launch import BranchFailedError, launch_branches
from merit_lab.training.spec import BranchSpec
from tests.conftest import write_pico_branch_assets

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    """A pico Llama θ0 with the demo tokenizer, and a 2-source mixture of 16 examples each."""
    return write_pico_branch_assets(
        tmp_path_factory.mktemp("launch_assets"),
        seed=1,
        n=16,
        ops={"add": lambda a, b: a + b, "min": min},
        partner=lambda a: a % 5,
    )


def make_spec(assets, out: Path, sources=("add",), **kw) -> BranchSpec:
    base, mix = assets
    return BranchSpec.from_dict(
        {
            "name": out.name,
            "base_model": str(base),
            "output_dir": str(out),
            "sources": sources,
            "mixture": {"path": str(mix), "eval_fraction": 0.0, "seed": 0, "calibration_n": 4},
            "lr": 1e-2,
            "batch_size": 4,
            "max_length": 64,
            "device": "cpu",
            "dtype": "float32",
            "save_steps": 2,
            **kw,
        }
    )


def manifest(final: Path) -> dict:
    return json.loads((final / "merit_branch.json").read_text())


def test_sequential_then_relaunch_skips(tmp_path, assets, monkeypatch):
    spec = make_spec(assets, tmp_path / "b0", sources=("add", "min"))
    [final] = launch_branches([spec])
    m = manifest(final)
    assert m["steps"] == 8 and m["examples"] == 32 and m["sources"] == ["add", "min"]

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a finished branch started a subprocess: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)  # finished: nothing may start
    assert launch_branches([spec.save(tmp_path / "spec.json")], mode="local") == [final]
    assert not (tmp_path / "b0" / "train.log").exists()


def test_local_subprocesses_two_at_a_time(tmp_path, assets):
    specs = [make_spec(assets, tmp_path / s, sources=(s,)) for s in ("add", "min")]
    bad = make_spec(assets, tmp_path / "bad", base_model=str(tmp_path / "missing"))
    # Three branches through two slots: the failure frees its slot and the others still finish.
    with pytest.raises(BranchFailedError, match=r"(?s)branch 'bad' failed.*no HF model folder"):
        launch_branches([specs[0], bad, specs[1]], mode="local", n_procs=2)
    for spec in specs:
        m = manifest(Path(spec.output_dir) / "final")
        assert m["sources"] == list(spec.sources) and m["steps"] == 4 and m["examples"] == 16
        assert m["tokens"] == sum(m["source_tokens"].values()) > 16 * 8
        assert m["torch_threads"] == max(1, (os.cpu_count() or 1) // 2)  # cores split 2 ways
        assert branch_status(spec.output_dir)["state"] == "done"
        assert (Path(spec.output_dir) / "train.log").is_file()
    assert branch_status(bad.output_dir)["state"] == "pending"
    # A re-launch of the good ones skips them and returns their final folders in order.
    finals = launch_branches(specs, mode="local", n_procs=2)
    assert finals == [tmp_path / "add" / "final", tmp_path / "min" / "final"]


def test_submitit_local_executor(tmp_path, assets):
    spec = make_spec(assets, tmp_path / "s0", sources=("min",))
    finals = launch_branches(
        [spec],
        mode="slurm",
        slurm={"cluster": "local", "timeout_min": 10},
        executor_folder=tmp_path / "jobs",
    )
    assert finals == [tmp_path / "s0" / "final"]
    assert manifest(finals[0])["steps"] == 4
    assert any((tmp_path / "jobs").glob("*_log.out"))  # submitit's own job logs


def test_a_branch_wider_than_the_gpus_given_is_refused(tmp_path, assets):
    spec = make_spec(assets, tmp_path / "w", procs_per_branch=2)  # batch 4: 2 x 2 per process
    with pytest.raises(ValueError, match=r"branch 'w' needs 2 GPUs: more than the 1 given"):
        launch_branches([spec], mode="local", gpus=[0])
    assert not (tmp_path / "w" / "train.log").exists()  # nothing was started
