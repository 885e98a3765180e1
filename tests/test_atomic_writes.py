"""Atomic writes a lab can share: every artifact of a run gets the modes the umask gives a plain
open()/mkdir(), and a write killed mid-way (SIGKILL) leaves a temp entry that `merit-lab show`
lists and the next run of its stage removes, the result then equal to an uninterrupted run's."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from merit_lab.cli import main
from merit_lab.config.schema import RunConfig, load_config
from merit_lab.io import (
    LockHeldError,
    atomic_dir,
    atomic_write_text,
    find_temp,
    is_temp_name,
    read_json,
    sha256_file,
    sweep_temp,
    temp_name,
)
from merit_lab.pipeline import RunDir, run_pipeline, runner
from tests.conftest import write_demo_slice, write_tiny_run_config

REPO = Path(__file__).resolve().parents[1]
SOURCES = [
    "reverse-a-terse-lower",
    "reverse-a-verbose-upper",
    "shift-a-terse-upper",
    "shift-a-verbose-lower",
]
UMASKS = (0o022, 0o002)

# A child that runs stages of a run under a umask and, given ``pause``, stops inside the write of
# the file of that name: the temp entries exist, the rename (io's os.replace) has not happened.
# It then writes ``ready`` and sleeps until the parent kills it.
CHILD = r"""
import json, os, sys, time
from pathlib import Path
a = json.loads(sys.argv[1])
if a.get("umask") is not None:
    os.umask(a["umask"])
import torch
torch.set_num_threads(1)
from merit_lab.config.schema import load_config
from merit_lab.pipeline import run_pipeline
real = os.replace
def replace(src, dst, **kw):
    if Path(dst).name == a.get("pause"):
        Path(a["ready"]).write_text("in the write")
        time.sleep(600)
    return real(src, dst, **kw)
os.replace = replace
cfg = load_config(a["config"], **a.get("override", {}))
run_pipeline(cfg, a.get("stages"))
"""


def _child(args: dict, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log, "wb") as f:  # a file, not a pipe: tqdm bars must not fill a pipe and block
        return subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(args)],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def _wait(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]


def _kill_in_write(args: dict, tmp: Path) -> None:
    """Run the child until it is inside the write ``args["pause"]`` names, then SIGKILL it."""
    ready, log = tmp / "ready", tmp / "child.log"
    ready.unlink(missing_ok=True)
    proc = _child({**args, "ready": str(ready)}, log)
    deadline = time.monotonic() + 240
    try:
        while not ready.exists():
            assert proc.poll() is None, f"the child ended before the write:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the child never reached the write:\n{log}"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _config(folder: Path, data: Path) -> Path:
    diagnostics = {
        "max_examples": 1,
        "alphas": 2,
        "sigmas": [0.0],
        "seeds": [0],
        "hessian_k": 1,
        "hessian_iter": 2,
        "curvature_examples": 1,
    }
    path = folder / "run.yaml"
    return write_tiny_run_config(path, data, folder / "runs", diagnostics=diagnostics)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """The same tiny run, every stage (diagnose and report too), written under umask 0022 and
    under 0002 by two child processes side by side (the test process keeps its umask)."""
    base = tmp_path_factory.mktemp("umask")
    data = write_demo_slice(base / "data", SOURCES, {"train": 12, "calibration": 8, "eval": 2})
    started = []
    for mask in UMASKS:
        folder = base / f"u{mask:03o}"
        folder.mkdir()
        log = folder / "child.log"
        started.append((_child({"config": str(_config(folder, data)), "umask": mask}, log), log))
    for proc, log in started:
        _wait(proc, log)
    return {mask: base / f"u{mask:03o}" / "runs" / "tiny" for mask in UMASKS}


def _copy_run(src: Path, dst: Path) -> tuple[Path, dict]:
    """A copy of a finished run, and the config overrides that point its config at the copy."""
    shutil.copytree(src, dst)
    return dst, {"output_dir": str(dst.parent), "name": dst.name}


def _rerun(root: Path, stages: list[str], caplog) -> RunDir:
    cfg = load_config(root / "config.yaml", output_dir=str(root.parent), name=root.name)
    with caplog.at_level(logging.WARNING, logger="merit_lab.io"):
        return run_pipeline(cfg, stages)


# ------------------------------------------------------------------------------------ modes
@pytest.mark.parametrize("mask", UMASKS, ids=lambda m: f"umask{m:03o}")
def test_every_artifact_of_a_run_gets_the_modes_of_the_umask(runs, mask):
    root = runs[mask]
    for must in [
        "report.md",
        "eval.parquet",
        "gradients/bank.safetensors",
        "merged/merit-1d/model.safetensors",
        "branches/merit-1d/0/final/model.safetensors",
        "joint/ep1-s0/final/merit_branch.json",
        "diagnostics/gain.json",
    ]:
        assert (root / must).is_file(), must
    wrong = {
        str(p.relative_to(root)): oct(stat.S_IMODE(p.lstat().st_mode))
        for p in [root, *root.rglob("*")]
        if stat.S_IMODE(p.lstat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~mask
    }
    assert wrong == {}
    assert find_temp(root) == [] and not (root / ".lock").exists()


def test_atomic_writes_open_private_entries_and_keep_the_rest(tmp_path):
    """mkstemp/mkdtemp-made entries inside an atomic folder get normal modes; others keep theirs."""
    code = (
        "import os, sys, tempfile\nfrom pathlib import Path\nos.umask(0o002)\n"
        "from merit_lab.io import atomic_dir, atomic_write_bytes\n"
        "out = Path(sys.argv[1])\natomic_write_bytes(out / 'a.bin', b'x')\n"
        "with atomic_dir(out / 'd') as t:\n"
        "    tempfile.mkstemp(dir=t, prefix='p')\n    os.mkdir(t / 'sub', 0o700)\n"
        "    (t / 'sub' / 'f').write_text('x')\n    (t / 'g').write_text('x')\n"
        "    os.chmod(t / 'g', 0o640)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=REPO)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert modes.pop("g") == 0o640  # not private: left as made
    assert {n: m for n, m in modes.items() if m != (0o775 if n in ("d", "sub") else 0o664)} == {}


# -------------------------------------------------------------------------------- temp names
def test_one_naming_pattern_for_temp_entries(tmp_path):
    name = temp_name("model.safetensors")
    assert name.startswith(".model.safetensors.") and is_temp_name(name)
    assert is_temp_name(name, "model.safetensors") and not is_temp_name(name, "model")
    assert is_temp_name(".merit-1d.k3_9zqa1.tmp")  # the mkdtemp names of earlier versions
    for other in ["model.safetensors", ".lock", "checkpoint-4", ".x.tmp", "a.abcdefgh.tmp"]:
        assert not is_temp_name(other), other
    (tmp_path / "d" / ".f.abcdefgh.tmp").mkdir(parents=True)
    (tmp_path / "d" / ".f.abcdefgh.tmp" / ".inner.abcdefgh.tmp").write_text("x")
    atomic_write_text(tmp_path / "d" / "kept.txt", "x")
    assert find_temp(tmp_path) == [tmp_path / "d" / ".f.abcdefgh.tmp"]  # not its inside
    assert find_temp(tmp_path, recursive=False) == []
    assert sweep_temp(tmp_path) == [tmp_path / "d" / ".f.abcdefgh.tmp"]
    assert [p.name for p in tmp_path.rglob("*")] == ["d", "kept.txt"]


def test_a_failed_atomic_folder_leaves_the_old_one_and_no_temp(tmp_path):
    with atomic_dir(tmp_path / "out") as t:
        (t / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out", overwrite=True) as t:
        (t / "v").write_text("2")
        raise RuntimeError
    with atomic_dir(tmp_path / "out", overwrite=True) as t:
        (t / "w").write_text("3")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out", "w"]


# ------------------------------------------------------------------- killed writes and sweep
def test_a_bank_write_killed_midway_is_swept_and_redone(runs, tmp_path, one_thread, caplog):
    root, override = _copy_run(runs[0o022], tmp_path / "runs" / "bank")
    shutil.rmtree(root / "gradients")
    _kill_in_write(
        {
            "config": str(root / "config.yaml"),
            "override": override,
            "stages": ["gradients"],
            "pause": "bank.safetensors",
        },
        tmp_path,
    )
    (left,) = find_temp(root)
    assert left.parent == root / "gradients" and is_temp_name(left.name, "bank.safetensors")
    assert not (root / "gradients" / "bank.safetensors").exists()
    _rerun(root, ["gradients"], caplog)
    assert f"removing {left}" in caplog.text and find_temp(root) == []
    new, old = (load_file(r / "gradients" / "bank.safetensors") for r in (root, runs[0o022]))
    assert new.keys() == old.keys()
    for key in new:
        np.testing.assert_allclose(new[key].numpy(), old[key].numpy(), rtol=1e-5, atol=1e-7)


def test_a_checkpoint_save_killed_midway_is_swept_and_redone(runs, tmp_path, one_thread, caplog):
    root, override = _copy_run(runs[0o022], tmp_path / "runs" / "ckpt")
    final = root / "branches" / "merit-1d" / "1" / "final"
    shutil.rmtree(final)
    # weights and tokenizer saved, the manifest (written last) not yet renamed into place
    _kill_in_write(
        {
            "config": str(root / "config.yaml"),
            "override": override,
            "stages": ["train"],
            "pause": "merit_branch.json",
        },
        tmp_path,
    )
    (left,) = find_temp(root)
    assert left.parent == final.parent and is_temp_name(left.name, "final")
    assert (left / "model.safetensors").is_file() and not final.exists()
    _rerun(root, ["train"], caplog)
    assert f"removing {left}" in caplog.text and find_temp(root) == []
    before = runs[0o022] / final.relative_to(root)
    new, old = (load_file(r / "model.safetensors") for r in (final, before))
    assert new.keys() == old.keys()
    for key in new:
        torch.testing.assert_close(new[key], old[key], rtol=1e-5, atol=1e-6)


def test_a_merge_killed_midway_is_listed_swept_and_redone(
    runs, tmp_path, one_thread, caplog, capsys
):
    root, override = _copy_run(runs[0o022], tmp_path / "runs" / "merge")
    shutil.rmtree(root / "merged" / "merit-1d")
    # weights and side files written, mergekit.yaml and the manifest not yet
    _kill_in_write(
        {
            "config": str(root / "config.yaml"),
            "override": override,
            "stages": ["merge"],
            "pause": "mergekit.yaml",
        },
        tmp_path,
    )
    (left,) = find_temp(root)
    assert left.parent == root / "merged" and is_temp_name(left.name, "merit-1d")
    assert (left / "model.safetensors").is_file() and not (left / "merge_manifest.json").exists()
    size = sum(p.stat().st_size for p in left.rglob("*") if p.is_file())

    assert main(["show", str(root)]) == 0
    out = capsys.readouterr().out
    assert "temp entries: 1" in out and f"{left}  " in out and "left by killed writes" in out
    assert f"{size / 1024**2:.1f} MiB" in out or f"{size / 1024:.1f} KiB" in out

    _rerun(root, ["merge"], caplog)
    assert f"removing {left}" in caplog.text and find_temp(root) == []
    assert "temp entries" not in (main(["show", str(root)]), capsys.readouterr().out)[1]
    done, before = (r / "merged" / "merit-1d" for r in (root, runs[0o022]))
    assert sha256_file(done / "model.safetensors") == sha256_file(before / "model.safetensors")
    files = [read_json(r / "merge_manifest.json")["output"]["files"] for r in (done, before)]
    for f in files:
        f.pop("mergekit.yaml")  # names its inputs' folders: this copy's, the original's
    assert files[0] == files[1]


# --------------------------------------------------------------------------- show and the lock
def _plant(root: Path) -> dict[str, Path]:
    """A leftover of the merge stage (a folder), of the mixture stage (a file), of training."""
    merged = root / "merged" / ".merit-1d.abcd1234.tmp"
    merged.mkdir(parents=True)
    (merged / "model.safetensors").write_bytes(b"\0" * 3000)
    mixture = root / ".mixture.json.zz99zz99.tmp"
    mixture.write_text("{")
    branch = root / "branches" / "merit-1d" / "0" / ".final.qwer_123.tmp"
    branch.mkdir(parents=True)
    return {"merged": merged, "mixture": mixture, "branch": branch}


@pytest.fixture
def cfg(tmp_path, monkeypatch) -> RunConfig:
    """A run whose mixture and merge stages do nothing (what the sweep does is under test)."""
    for name in ("mixture", "merge"):
        monkeypatch.setitem(runner.STAGES, name, lambda cfg, run: False)
    return RunConfig(name="swept", output_dir=str(tmp_path / "runs"))


def test_show_lists_temp_entries_with_their_size_and_a_hint(cfg, capsys):
    run = RunDir(cfg.run_dir)
    run.root.mkdir(parents=True)
    cfg.save(run.config)
    planted = _plant(run.root)
    assert main(["show", str(run.root)]) == 0
    out = capsys.readouterr().out
    assert "temp entries: 3, 2.9 KiB" in out
    assert f"{planted['merged']}  2.9 KiB" in out and f"{planted['mixture']}  1 B" in out
    assert f"{planted['branch']}  0 B" in out and "left by killed writes" in out
    with run.writer_lock(command="merit-lab run x.yaml"):  # a live writer: its writes, maybe
        assert main(["show", str(run.root)]) == 0
    assert f"may be running (pid {os.getpid()}" in capsys.readouterr().out


def test_the_lock_holder_sweeps_only_the_stages_it_runs(cfg, caplog):
    run = RunDir(cfg.run_dir)
    planted = _plant(run.root)
    with caplog.at_level(logging.WARNING, logger="merit_lab.io"):
        run_pipeline(cfg, ["mixture", "merge"])
    assert not planted["merged"].exists() and not planted["mixture"].exists()
    assert planted["branch"].exists()  # the train stage did not run: not its leftover to take
    assert "removing" in caplog.text and "3000 bytes" in caplog.text


def test_no_sweep_while_another_live_writer_holds_the_lock(cfg):
    run = RunDir(cfg.run_dir)
    planted = _plant(run.root)
    proc = subprocess.Popen(["sleep", "30"])
    try:
        holder = {
            "pid": proc.pid,
            "host": socket.gethostname(),
            "started": "2024-05-01T09:30:00",
            "command": "merit-lab run other.yaml",
        }
        run.lock.write_text(json.dumps(holder))
        with pytest.raises(LockHeldError, match=str(proc.pid)):
            run_pipeline(cfg, ["mixture", "merge"])  # refused before any sweep
        with pytest.raises(LockHeldError, match="only the writer holding"):
            run.sweep_temp(["mixture", "merge"])  # not this process's lock
        assert all(p.exists() for p in planted.values()) and read_json(run.lock) == holder
    finally:
        proc.kill()
        proc.wait()
    run_pipeline(cfg, ["mixture", "merge"])  # its writer gone: the lock is taken over, swept
    assert not planted["merged"].exists() and planted["branch"].exists()
