"""One writer per run directory: ``runs/<name>/.lock`` names the holder; a second writer is
refused, a dead holder's lock on this host is taken over, another host's never is."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pandas as pd
import pytest

from merit_lab.config.schema import RunConfig
from merit_lab.io import LockHeldError, hold_lock, read_json
from merit_lab.pipeline import RunDir, run_pipeline, runner


@pytest.fixture
def cfg(tmp_path) -> RunConfig:
    return RunConfig(name="locked", output_dir=str(tmp_path / "runs"))


@pytest.fixture
def seen_lock(monkeypatch) -> list[dict]:
    """Replace the mixture stage by one that records the lock it runs under."""
    seen: list[dict] = []

    def stage(cfg: RunConfig, run: RunDir) -> bool:
        seen.append(read_json(run.lock))
        return False

    monkeypatch.setitem(runner.STAGES, "mixture", stage)
    return seen


def _write_lock(run: RunDir, pid: int, host: str | None = None) -> dict:
    holder = {
        "pid": pid,
        "host": host or socket.gethostname(),
        "started": "2024-05-01T09:30:00+00:00",
        "command": "merit-lab run configs/other.yaml",
    }
    run.root.mkdir(parents=True, exist_ok=True)
    run.lock.write_text(json.dumps(holder))
    return holder


def test_the_lock_names_the_writer_and_is_gone_after_success(cfg, seen_lock):
    run = run_pipeline(cfg, ["mixture"])
    (holder,) = seen_lock
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert set(holder) == {"pid", "host", "started", "command"} and holder["started"][:2] == "20"
    assert not run.lock.exists()


def test_the_lock_is_gone_after_a_failing_stage(cfg, monkeypatch):
    def fail(cfg, run):
        assert run.lock.is_file()
        raise RuntimeError("stage failed")

    monkeypatch.setitem(runner.STAGES, "mixture", fail)
    with pytest.raises(RuntimeError, match="stage failed"):
        run_pipeline(cfg, ["mixture"])
    assert not RunDir(cfg.run_dir).lock.exists()


def test_a_live_writer_refuses_a_second_one(cfg, seen_lock):
    run = RunDir(cfg.run_dir)
    proc = subprocess.Popen(["sleep", "30"])
    try:
        holder = _write_lock(run, proc.pid)
        with pytest.raises(LockHeldError) as err:
            run_pipeline(cfg, ["mixture"])
        msg = str(err.value)
        for part in [str(proc.pid), holder["host"], holder["started"], holder["command"]]:
            assert part in msg
        assert f"kill {proc.pid}" in msg
        assert seen_lock == [] and read_json(run.lock) == holder  # untouched
    finally:
        proc.kill()
        proc.wait()


def test_a_dead_writers_lock_is_taken_over_with_a_warning(cfg, seen_lock, caplog):
    run = RunDir(cfg.run_dir)
    proc = subprocess.Popen(["true"])
    proc.wait()  # exited and reaped: its pid names no process
    _write_lock(run, proc.pid)
    with caplog.at_level(logging.WARNING, logger="merit_lab.io"):
        run_pipeline(cfg, ["mixture"])
    assert f"taking over the lock of pid {proc.pid}" in caplog.text
    assert seen_lock[0]["pid"] == os.getpid()
    assert not run.lock.exists()


def test_another_hosts_lock_is_never_taken_over(cfg, seen_lock):
    run = RunDir(cfg.run_dir)
    proc = subprocess.Popen(["true"])
    proc.wait()  # dead here, but the pid means nothing on the other host
    holder = _write_lock(run, proc.pid, host="gpu-node-7")
    with pytest.raises(LockHeldError, match="gpu-node-7") as err:
        run_pipeline(cfg, ["mixture"])
    assert f"delete {run.lock}" in str(err.value) and "not taken over" in str(err.value)
    assert seen_lock == [] and read_json(run.lock) == holder


def test_nested_writers_in_one_process_share_the_lock(cfg, seen_lock):
    run = RunDir(cfg.run_dir)
    with run.writer_lock(command="outer") as held:
        run_pipeline(cfg, ["mixture"])
        assert held.lock.is_file() and read_json(run.lock)["command"] == "outer"
    assert seen_lock[0]["command"] == "outer" and not run.lock.exists()


def test_hold_lock_refuses_while_held_and_frees_after(tmp_path):
    path = tmp_path / ".lock"
    with hold_lock(path, command="first"):
        code = (
            "import sys\nfrom merit_lab.io import hold_lock, LockHeldError\n"
            "try:\n    with hold_lock(sys.argv[1]): pass\n"
            "except LockHeldError as e:\n    print(e); sys.exit(3)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True
        )
        assert done.returncode == 3 and "'first'" in done.stdout
    assert not path.exists()
    with hold_lock(path):  # free again
        assert read_json(path)["pid"] == os.getpid()


def test_the_cli_names_the_holder_instead_of_a_traceback(cfg, capsys):
    from merit_lab.cli import main

    run = RunDir(cfg.run_dir)
    run.root.mkdir(parents=True)
    cfg.save(run.config)
    proc = subprocess.Popen(["sleep", "30"])
    try:
        _write_lock(run, proc.pid)
        assert main(["diagnose", str(run.root)]) == 2
    finally:
        proc.kill()
        proc.wait()
    err = capsys.readouterr().err
    assert err.startswith("merit-lab: error: ") and f"pid {proc.pid}" in err


NOTEBOOK_WRITERS = [
    "train_experiments",
    "merge_rows",
    "evaluate_rows",
    "run_diagnostics",
    "save_convergence",
]


def _call_writer(name: str, cfg: RunConfig):
    from merit_lab.pipeline import diagnose, experiments

    if name == "run_diagnostics":
        return diagnose.run_diagnostics(cfg.run_dir, progress=False)
    if name == "save_convergence":
        from merit_lab.pipeline import save_convergence

        return save_convergence(cfg.run_dir, pd.DataFrame({"n": [8], "cosine": [0.9]}))
    return getattr(experiments, name)(cfg)


@pytest.mark.parametrize("name", NOTEBOOK_WRITERS)
def test_what_notebooks_call_to_write_a_run_is_refused_while_another_writes(cfg, name):
    run = RunDir(cfg.run_dir)
    proc = subprocess.Popen(["sleep", "30"])
    try:
        holder = _write_lock(run, proc.pid)
        with pytest.raises(LockHeldError, match=f"pid {proc.pid} ") as err:
            _call_writer(name, cfg)  # refused before it reads or writes anything
        assert holder["command"] in str(err.value) and read_json(run.lock) == holder
    finally:
        proc.kill()
        proc.wait()


def test_a_notebook_writer_holds_the_lock_while_it_runs(cfg, monkeypatch):
    from merit_lab.pipeline import experiments

    run = RunDir(cfg.run_dir)
    run.root.mkdir(parents=True)
    seen: list[dict] = []
    monkeypatch.setattr(
        experiments, "plan_specs", lambda cfg, exps: seen.append(read_json(run.lock)) or {}
    )
    assert experiments.train_experiments(cfg) == []
    assert seen[0]["pid"] == os.getpid() and seen[0]["command"].startswith("train_experiments() ")
    assert not run.lock.exists()


def test_save_convergence_writes_the_table_atomically(cfg):
    from merit_lab.pipeline import save_convergence

    run = RunDir(cfg.run_dir)
    run.root.mkdir(parents=True)
    table = pd.DataFrame({"source": ["a", "b"], "n": [8, 16], "cosine": [0.91, 0.97]})
    assert save_convergence(run.root, table) == run.convergence
    pd.testing.assert_frame_equal(pd.read_parquet(run.convergence), table)
    assert not run.lock.exists() and not run.temp_entries()
