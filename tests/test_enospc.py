"""A real full disk: `merit-lab run` on a size-limited tmpfs fills it while writing the gradient
bank, a training checkpoint and a merged model. Each time: one `merit-lab: error:` line naming the
file ("No space left on device"), the earlier artifacts unchanged, no temp entry left; once space
is freed the same command resumes, and the finished run equals an uninterrupted one bit for bit.

The tmpfs is mounted in a user and mount namespace (``unshare -rm``: no root needed where the
kernel allows unprivileged user namespaces); it exists only while the driver below runs inside
that namespace, so the driver runs every step there and reports what it saw as JSON, and copies
the finished weights out. Where the namespace or the mount is refused the test is skipped,
naming why (`tests/test_faults.py` covers the same writes with a file size limit, EFBIG).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_demo_slice, write_tiny_run_config

REPO = Path(__file__).resolve().parents[1]
SOURCES = [
    "reverse-a-terse-lower",
    "reverse-a-verbose-upper",
    "shift-a-terse-upper",
    "shift-a-verbose-lower",
]
# Runs inside the namespace: argv = report, config, mount point, reference output, copy folder.
DRIVER = r"""
import hashlib, json, os, shutil, subprocess, sys
from pathlib import Path
report, config, mnt, ref_out, copies = sys.argv[1:6]
mnt = Path(mnt)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mnt)], check=True)
exe = str(Path(sys.executable).parent / "merit-lab")
run = mnt / "runs" / "tiny"
ballast = mnt / "ballast"

def merit(*extra, out=mnt / "runs"):
    cmd = [exe, "run", config, "--output-dir", str(out), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return {"rc": p.returncode, "output": (p.stdout + p.stderr)[-6000:]}

def hashes(skip=("config.yaml", "timings.json")):
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()
            and not str(p.relative_to(run)).startswith(skip) and p.name != ".lock"}

def temps():
    return [str(p.relative_to(run)) for p in run.rglob(".*.tmp")]

def fill(free):
    # leave `free` bytes on the tmpfs: a ballast file of zeros takes the rest
    st = os.statvfs(mnt)
    size = st.f_bavail * st.f_frsize - free
    with open(ballast, "wb") as f:
        while size > 0:
            n = min(size, 1 << 20)
            f.write(b"\0" * n)
            size -= n

def full_step(name, free, until):
    before = hashes()
    fill(free)
    failed = merit("--until", until)
    after = hashes()
    failed.update(name=name, before=before, after=after, temps=temps())
    ballast.unlink()  # space freed
    failed["resumed"] = merit("--until", until)
    failed["after_resume"] = hashes()
    return failed

steps = {"reference": merit("--until", "merge", out=Path(ref_out))}
ref = Path(ref_out) / "tiny"
# the space each failing write finds: what the stage writes before it, and half of it
parts = sum(p.stat().st_size for p in (ref / "gradients" / "parts").rglob("*") if p.is_file())
bank = (ref / "gradients" / "bank.safetensors").stat().st_size
folds = (ref / "gradients" / "folds.safetensors").stat().st_size  # the bank's first file
model = (ref / "merged" / "merit-1d" / "model.safetensors").stat().st_size
steps["sizes"] = {"parts": parts, "bank": bank, "folds": folds, "model": model}
steps["mixture"] = merit("--until", "mixture")
steps["bank"] = full_step("bank", parts + (1 << 20) + folds // 2, "partition")
steps["checkpoint"] = full_step("checkpoint", model // 2, "train")
steps["merge"] = full_step("merge", model // 2, "merge")
steps["temps_at_end"] = temps()
weights = [run / "gradients" / "bank.safetensors", run / "gradients" / "folds.safetensors",
           *run.glob("**/final/model.safetensors"),
           *run.glob("merged/*/model.safetensors")]
for p in weights:
    dst = Path(copies) / p.relative_to(run)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(p, dst)
Path(report).write_text(json.dumps(steps))
"""


def _namespace_problem(tmp_path: Path) -> str | None:
    """Why a tmpfs cannot be mounted here without root (None: it can)."""
    if shutil.which("unshare") is None:
        return "no unshare command (util-linux)"
    probe = tmp_path / "probe"
    probe.mkdir()
    cmd = ["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`unshare -rm mount -t tmpfs` failed: {e}"
    if p.returncode != 0:
        return (
            "unprivileged user + mount namespaces are not allowed here (`unshare -rm mount -t "
            f"tmpfs` said: {p.stderr.strip()[-300:]})"
        )
    return None


def _space_error(step: dict) -> str:
    errors = [ln for ln in step["output"].splitlines() if "merit-lab: error:" in ln]
    assert step["rc"] == 2 and "Traceback" not in step["output"], step["output"][-3000:]
    assert len(errors) == 1, step["output"][-3000:]
    return errors[0].split("merit-lab: error: ")[1]


@pytest.mark.slow
def test_a_full_tmpfs_fails_with_one_line_keeps_what_was_written_and_resumes(tmp_path):
    problem = _namespace_problem(tmp_path)
    if problem:
        pytest.skip(problem)
    data = write_demo_slice(tmp_path / "data", SOURCES, {"train": 12, "calibration": 8, "eval": 2})
    train = {"batch_size": 8, "lr": 1e-3, "save_steps": 2}
    config = write_tiny_run_config(
        tmp_path / "run.yaml", data, tmp_path / "unused", device="cpu", train=train
    )
    mnt, copies, report = tmp_path / "mnt", tmp_path / "copies", tmp_path / "report.json"
    mnt.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [str(report), str(config), str(mnt), str(tmp_path / "ref"), str(copies)]
    driver = subprocess.run(
        ["unshare", "-rm", sys.executable, "-c", DRIVER, *args],
        env=env,
        capture_output=True,
        text=True,
    )
    assert driver.returncode == 0, (driver.stdout + driver.stderr)[-4000:]
    steps = json.loads(report.read_text())
    assert steps["reference"]["rc"] == 0, steps["reference"]["output"][-3000:]
    assert steps["mixture"]["rc"] == 0, steps["mixture"]["output"][-3000:]
    run = mnt / "runs" / "tiny"  # as the messages name it, inside the namespace
    written = {
        "bank": run / "gradients" / "folds.safetensors",  # the bank's first file: its fold rows
        "checkpoint": run
        / "joint"
        / "ep1-s0"
        / "checkpoints"
        / "checkpoint-2"
        / "model.safetensors",
        "merge": run / "merged" / "merit-1d" / "model.safetensors",
    }
    kept = {  # what each failed write must leave exactly as it was
        "bank": lambda rel: True,
        "checkpoint": lambda rel: not rel.startswith(("joint/", "branches/")),
        "merge": lambda rel: not rel.startswith(("merged/", "merge.json")),
    }
    for name, path in written.items():
        step = steps[name]
        message = _space_error(step)
        assert message.startswith(
            f"ran out of space writing {path}: No space left on device. Free some space and "
            "run the same command again"
        ), message
        assert step["temps"] == [], (name, step["temps"])  # the cut write removed its temp
        for rel, digest in step["before"].items():
            if kept[name](rel):
                assert step["after"].get(rel) == digest, (name, rel)
        assert step["resumed"]["rc"] == 0, step["resumed"]["output"][-3000:]
        for rel, digest in step["before"].items():  # the resumed run kept them too
            if kept[name](rel):
                assert step["after_resume"].get(rel) == digest, (name, rel)
    bank_files = [
        "gradients/folds.safetensors",
        "gradients/bank.safetensors",
        "gradients/bank.json",
    ]
    assert [f for f in bank_files if f in steps["bank"]["after"]] == []
    assert len([r for r in steps["bank"]["after"] if r.startswith("gradients/parts/")]) == 4
    assert steps["temps_at_end"] == []
    # the finished run: the uninterrupted run's weights, bit for bit
    ref = tmp_path / "ref" / "tiny"
    finals = sorted(p.relative_to(copies) for p in copies.rglob("*.safetensors"))
    assert len(finals) == 6  # the bank, its fold rows, joint, the 2 branches, the merge
    for rel in finals:
        a, b = load_file(ref / rel), load_file(copies / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
