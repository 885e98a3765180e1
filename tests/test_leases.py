"""Leases: a job launched by a runner holds a heartbeat file under the run (``.leases/``) while
it runs; a later runner waits for a live one instead of sweeping its temp entries or launching
its unit again, and removes the lease of a job that is gone.

The orphan test SIGKILLs `merit-lab run` while a local branch job trains (parked, by itself, at
its second logged step), starts a new runner, lets the branch go on once the new runner says it
waits for it, and checks the result against an uninterrupted run bit for bit. Every moment is an
event (a file, a log line), never a time.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merit_lab.io import temp_name
from merit_lab.jobs import LEASE_STALE_S, hold_lease, live_leases
from merit_lab.pipeline import RunDir
from tests.conftest import write_demo_slice, write_tiny_run_config

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 1800  # only against a hang: no assert depends on how fast anything runs


def _until(done, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Wait for the event ``done()`` (a hang guard, not a timing)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not done():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None else ""
            raise AssertionError(f"exited ({proc.returncode}) before {what}:\n{tail}")
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def test_a_lease_is_written_renewed_and_released(tmp_path):
    folder = tmp_path / ".leases"
    with hold_lease(folder, "branch 'a'", beat_s=0.01) as path:
        held = json.loads(path.read_text())
        assert (held["job"], held["pid"], held["host"]) == (
            "branch 'a'",
            os.getpid(),
            socket.gethostname(),
        )
        assert path.parent == folder and path.name.startswith("branch_a.")
        os.utime(path, (0, 0))
        _until(lambda: path.stat().st_mtime > 0, "the heartbeat renews the lease")
        assert [lease["job"] for lease in live_leases(folder)] == ["branch 'a'"]
    assert list(folder.iterdir()) == []


def _write_lease(folder: Path, name: str, **holder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"job": name, "started": "then", **holder}))
    return path


def test_the_lease_of_a_job_that_is_gone_is_removed_and_a_live_one_kept(tmp_path, caplog):
    folder = tmp_path / ".leases"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid is free now
    host = socket.gethostname()
    dead = _write_lease(folder, "dead", pid=gone.pid, host=host)
    mine = _write_lease(folder, "mine", pid=os.getpid(), host=host)
    far = _write_lease(folder, "far", pid=1, host="another-host")  # fresh heartbeat: alive
    old = _write_lease(folder, "old", pid=1, host="another-host")
    os.utime(old, (time.time() - LEASE_STALE_S - 1,) * 2)  # its heartbeat stopped
    with caplog.at_level(logging.WARNING, logger="merit_lab.jobs"):
        live = live_leases(folder)
    assert sorted(lease["job"] for lease in live) == ["far", "mine"]
    assert mine.exists() and far.exists() and not dead.exists() and not old.exists()
    assert "is no longer running; its lease is removed" in caplog.text


HOLDER = """
import sys, time
from pathlib import Path
from merit_lab.jobs import hold_lease
folder, temp, release = map(Path, sys.argv[1:4])
with hold_lease(folder, "branch 'b'"):
    temp.mkdir(parents=True)
    (temp / "model.safetensors").write_bytes(b"half")  # a write in progress
    Path(sys.argv[4]).write_text("holding")
    while not release.exists():
        time.sleep(0.01)
    (temp / "model.safetensors").write_bytes(b"whole")
    temp.rename(temp.parent / "final")
"""


def test_a_new_writer_waits_for_a_live_lease_and_never_sweeps_its_temp(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    branch = run.root / "branches" / "m" / "0"
    temp = branch / temp_name("final")
    release, holding = tmp_path / "release", tmp_path / "holding"
    job = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *map(str, (run.root / ".leases", temp, release, holding))],
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        _until(holding.exists, "the job holds its lease", job)
        swept: list = []

        def writer() -> None:
            with run.writer_lock():
                swept.extend(run.sweep_temp(["train"]))

        with caplog.at_level(logging.WARNING, logger="merit_lab.jobs"):
            thread = threading.Thread(target=writer)
            thread.start()
            _until(lambda: "waiting for branch 'b'" in caplog.text, "the writer waits")
            assert thread.is_alive() and temp.is_dir()  # neither swept nor raced
            release.touch()
            thread.join()
        assert job.wait() == 0
    finally:
        job.kill()
    assert swept == [] and (branch / "final" / "model.safetensors").read_bytes() == b"whole"
    assert f"pid {job.pid} on host {socket.gethostname()!r}" in caplog.text
    assert list((run.root / ".leases").iterdir()) == []


# --------------------------------------------------------------------------- the orphan test
# Every trainer process (``python -m merit_lab.training.trainer SPEC``) stamps its start and end
# with its pid; with LEASE_TEST_PARK set, the first to open its log.jsonl a second time (its
# second logged step: mid-branch) records its pid there and stops itself (SIGSTOP), in the
# training thread, until the test continues it.
SITECUSTOMIZE = r"""
import atexit, os, signal, sys, time
_argv = open("/proc/self/cmdline", "rb").read().split(b"\0")
if _argv[1:3] == [b"-m", b"merit_lab.training.trainer"] and os.environ.get("LEASE_TEST_STAMPS"):
    _spec, _opens = _argv[3].decode(), [0]

    def _stamp(what):
        with open(os.environ["LEASE_TEST_STAMPS"], "a") as f:
            f.write(f"{what} {os.getpid()} {time.time_ns()} {_spec}\n")

    def _hook(event, args):
        if event != "open" or not isinstance(args[0], (str, os.PathLike)):
            return
        if not os.fspath(args[0]).endswith("log.jsonl") or args[1] != "a":
            return
        _opens[0] += 1
        park = os.environ.get("LEASE_TEST_PARK")
        if _opens[0] == 2 and park:
            try:
                fd = os.open(park, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return  # another branch parked already
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGSTOP)

    _stamp("start")
    atexit.register(_stamp, "end")
    sys.addaudithook(_hook)
"""
SOURCES = [
    "reverse-a-terse-lower",
    "reverse-a-verbose-upper",
    "shift-a-terse-upper",
    "shift-a-verbose-lower",
]


def _runner(config: Path, out: Path, log: Path, env: dict) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "merit-lab"
    cmd = [str(exe), "run", str(config), "--until", "merge", "--output-dir", str(out)]
    with open(log, "ab") as f:
        return subprocess.Popen(
            cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stamps(path: Path) -> dict[str, list[tuple[int, int, int]]]:
    """spec → [(pid, start ns, end ns)] of the trainer processes that ran it."""
    events: dict[tuple[int, str], dict[str, int]] = {}
    for line in path.read_text().splitlines():
        what, pid, ns, spec = line.split(" ", 3)
        events.setdefault((int(pid), spec), {})[what] = int(ns)
    out: dict[str, list[tuple[int, int, int]]] = {}
    for (pid, spec), e in sorted(events.items(), key=lambda kv: kv[1]["start"]):
        out.setdefault(spec, []).append((pid, e["start"], e.get("end", -1)))
    return out


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    files = sorted(run.glob("**/final/model.safetensors")) + sorted(
        run.glob("merged/*/model.safetensors")
    )
    return {str(p.relative_to(run)): load_file(p) for p in files}


@pytest.mark.slow
def test_a_killed_runner_leaves_no_orphan_and_nothing_runs_twice(tmp_path):
    data = write_demo_slice(tmp_path / "data", SOURCES, {"train": 12, "calibration": 8, "eval": 2})
    train = {"batch_size": 8, "lr": 1e-3, "save_steps": 2, "launcher": "local"}
    config = write_tiny_run_config(
        tmp_path / "run.yaml", data, tmp_path / "unused", device="cpu", train=train
    )
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    stamps, park = tmp_path / "stamps.txt", tmp_path / "parked"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]),
        "LEASE_TEST_STAMPS": str(stamps),
    }
    ref_log = tmp_path / "ref.log"
    ref = _runner(config, tmp_path / "ref", ref_log, env)
    assert ref.wait(timeout=HANG_GUARD_S) == 0, ref_log.read_text()[-3000:]
    stamps.unlink()

    out, log_a, log_b = tmp_path / "runs", tmp_path / "a.log", tmp_path / "b.log"
    env_a = {**env, "LEASE_TEST_PARK": str(park)}
    runner_a = _runner(config, out, log_a, env_a)
    trainer = None
    try:
        _until(lambda: park.is_file() and park.read_text(), "a branch parks", runner_a, log_a)
        trainer = int(park.read_text())
        os.kill(runner_a.pid, signal.SIGKILL)  # the runner alone: its branch job lives on
        runner_a.wait()
        run = out / "tiny"
        (lease,) = live_leases(run / ".leases")
        assert lease["runner"] == runner_a.pid

        runner_b = _runner(config, out, log_b, env)
        _until(lambda: "waiting for branch '" in log_b.read_text(), "B waits", runner_b, log_b)
        parked = next(
            Path(spec).parent
            for what, pid, _, spec in (ln.split(" ", 3) for ln in stamps.read_text().splitlines())
            if what == "start" and int(pid) == trainer
        )
        assert not (parked / "final").exists()  # mid-branch: one logged step
        assert len((parked / "log.jsonl").read_text().splitlines()) == 1
        os.kill(trainer, signal.SIGCONT)  # the orphan finishes its unit
        assert runner_b.wait(timeout=HANG_GUARD_S) == 0, log_b.read_text()[-3000:]
    finally:
        if trainer is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(trainer, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(runner_a.pid, signal.SIGKILL)

    text = log_b.read_text()
    assert f"waiting for {lease['job']} (pid {lease['pid']}" in text
    runs = _stamps(stamps)
    # each branch trained by exactly one process, the parked one included: never relaunched
    assert all(len(procs) == 1 for procs in runs.values()), runs
    assert trainer in {pid for procs in runs.values() for pid, _, _ in procs}
    spans = sorted((start, end) for procs in runs.values() for _, start, end in procs)
    assert all(end > 0 for _, end in spans)  # every one ran to its end
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))  # one at a time
    # the result: the uninterrupted run's, bit for bit; nothing left behind
    mine, theirs = _weights(out / "tiny"), _weights(tmp_path / "ref" / "tiny")
    assert sorted(mine) == sorted(theirs) and len(mine) == 4  # joint, 2 branches, the merge
    for rel, tensors in theirs.items():
        assert tensors.keys() == mine[rel].keys()
        assert all(torch.equal(tensors[k], mine[rel][k]) for k in tensors), rel
    assert RunDir(out / "tiny").temp_entries() == []
    assert list((out / "tiny" / ".leases").glob("*")) == []
    assert not (out / "tiny" / ".lock").exists()
