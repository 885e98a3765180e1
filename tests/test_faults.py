"""Faults: `merit-lab run` SIGKILLed at moments through every stage and resumed, a disk that fills
up, and two writers on one run directory.

The kill campaign costs about one run plus a process start per kill: one uninterrupted reference
run, then one run directory killed and resumed again and again, each kill later in the run than
the one before, and the finished run compared with the reference file by file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from merit_lab.config.schema import load_config
from merit_lab.io import LockHeldError, find_temp, is_temp_name, read_json
from merit_lab.pipeline import RunDir, load_edit_session, run_pipeline, stage_status
from merit_lab.pipeline.diagnose import run_diagnostics
from merit_lab.pipeline.experiments import evaluate_rows, merge_rows, train_experiments
from merit_lab.pipeline.runner import STAGES
from tests.conftest import write_demo_slice, write_tiny_run_config

REPO = Path(__file__).resolve().parents[1]
SOURCES = [
    "reverse-a-terse-lower",
    "reverse-a-verbose-upper",
    "shift-a-terse-upper",
    "shift-a-verbose-lower",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

# Fields that hold wall times or rates (or are derived from them): the only ones allowed to
# differ between an uninterrupted run and a killed-and-resumed one. `throughput` in bank.json
# also counts only the sources computed by the last (resumed) gradient stage.
VOLATILE = {
    "seconds",
    "fold_seconds",  # a source's extra sketch passes for its fold rows (bank.json, each part)
    "lanczos_seconds",
    "tokens_per_s",
    "time",
    "created",
    "updated",
    "throughput",
}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

# `merit-lab run` with a hook: the process stops (writes ``ready`` and sleeps until the parent
# kills its group) at one moment: just before or just after the rename that puts a file matching
# ``target`` in place (the temp file written, or the artifact complete), or on the nth call of a
# function. Each stage it enters is appended to ``progress``.
CHILD = r"""
import fnmatch, importlib, json, os, sys, time
from pathlib import Path
a = json.loads(sys.argv.pop(1))
kill = a.get("kill") or {}
def stop():
    Path(a["ready"]).write_text("stopped")
    while True:  # until the parent kills the group, however long it takes to notice
        time.sleep(60)
if kill.get("how") in ("before", "after"):
    real, seen = os.replace, [0]
    def replace(src, dst, **kw):
        hit = fnmatch.fnmatch(os.fspath(dst), "*/" + kill["target"])
        seen[0] += hit
        if hit and seen[0] == kill["nth"] and kill["how"] == "before":
            stop()
        out = real(src, dst, **kw)
        if hit and seen[0] == kill["nth"]:
            stop()
        return out
    os.replace = replace
elif kill.get("how") == "call":
    module, name = kill["target"].split(":")
    owner, attr = importlib.import_module(module), name.split(".")
    for part in attr[:-1]:
        owner = getattr(owner, part)
    real_fn, calls = getattr(owner, attr[-1]), [0]
    def hooked(*args, **kw):
        calls[0] += 1
        if calls[0] == kill["nth"]:
            stop()
        return real_fn(*args, **kw)
    setattr(owner, attr[-1], hooked)
from merit_lab.pipeline import runner
for stage, fn in list(runner.STAGES.items()):
    def entered(cfg, run, _stage=stage, _fn=fn):
        with open(a["progress"], "a") as f:
            f.write(_stage + "\n")
        return _fn(cfg, run)
    runner.STAGES[stage] = entered
from merit_lab.cli import main
sys.argv = ["merit-lab", *a["argv"]]
sys.exit(main(a["argv"]))
"""


def _merit_lab() -> list[str]:
    """The installed `merit-lab` command (the module when no script is beside this Python)."""
    script = Path(sys.executable).parent / "merit-lab"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "merit_lab.cli"]


def _start(cmd: list[str], log: Path, cwd: Path | None = None, **kw) -> subprocess.Popen:
    """A child in its own process group (killed as a whole), its output in ``log``, run in
    ``cwd`` (default: the log's folder)."""
    with open(log, "ab") as f:  # a file, not a pipe: a full pipe would block the child
        return subprocess.Popen(
            cmd,
            cwd=cwd or log.parent,
            env=ENV,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kw,
        )


def _kill_group(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def _finish(
    cmd: list[str], log: Path, timeout: float = 1800, cwd: Path | None = None
) -> subprocess.Popen:
    """Run ``cmd`` to its end (``timeout``: a hang guard, not a speed requirement)."""
    proc = _start(cmd, log, cwd)
    try:
        proc.wait(timeout=timeout)
    finally:
        _kill_group(proc)
    return proc


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """The tiny run (4 demo sources x 12 examples; a joint and a MERIT-1D row; checkpoints every
    2 steps, so a killed branch resumes from one; every stage, diagnose and report included)
    run once uninterrupted, then moved to ``ref/`` so the campaign can use its exact path."""
    base = tmp_path_factory.mktemp("faults")
    data = write_demo_slice(base / "data", SOURCES, {"train": 12, "calibration": 8, "eval": 2})
    diagnostics = {
        "max_examples": 1,
        "alphas": 2,
        "sigmas": [0.0],
        "seeds": [0],
        "hessian_k": 1,
        "hessian_iter": 2,
        "curvature_examples": 1,
    }
    train = {"batch_size": 8, "lr": 1e-3, "save_steps": 2}
    config = write_tiny_run_config(
        base / "run.yaml", data, base / "runs", device="cpu", train=train, diagnostics=diagnostics
    )
    log = base / "reference.log"
    proc = _finish([*_merit_lab(), "run", str(config)], log)
    assert proc.returncode == 0, log.read_text()[-3000:]
    (base / "runs").rename(base / "ref")
    return {
        "base": base,
        "config": config,
        "ref": base / "ref" / "tiny",
        "run": base / "runs" / "tiny",
    }


# -------------------------------------------------------------------------- comparing two runs
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _strip(obj):
    """JSON without its `VOLATILE` fields."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _json_or_text(text: str):
    try:
        return _strip(json.loads(text))
    except ValueError:
        return text


def _without_wall_times(report: str) -> str:
    """report.md less its "Wall time per stage" section (seconds and tokens/s), its "On
    demand" line (costs estimated from the gradient stage's time in timings.json, which a kill
    between the bank and its timings.json entry loses: the resumed report has no line) and the
    seconds of the fold passes in "What the folds cost this run" (its micro-batches stay)."""
    report = re.sub(r"## Wall time per stage.*?(?=\n## |\nFigures are )", "", report, flags=re.S)
    report = re.sub(
        r"(\*\*What the folds cost this run\.\*\*) .*? in the gradient stage \([^)]*\)\."
        r"( A pass reads every .*? grows\.)?",
        r"\1",
        report,
    )
    return re.sub(r"^On demand, not computed in this run: .*\n\n", "", report, flags=re.M)


def _compare_file(rel: str, a: Path, b: Path) -> str | None:
    """How ``b`` equals ``a``: "identical", "modulo times" (only `VOLATILE` fields, plotly's
    random div ids or the report's wall-time section differ; a safetensors file's tensors are
    then bit-identical); or a description of how it differs (a failure). Tensors are held to bit
    equality, as the docs claim (docs/reference/run-directory.md, "Faults, tested")."""
    if _sha(a) == _sha(b):
        return "identical"
    if rel == "timings.json":  # every value a time; the stages timed are compared in the test
        return "modulo times"
    if a.suffix == ".json":
        return "modulo times" if _strip(read_json(a)) == _strip(read_json(b)) else "json differs"
    if a.suffix == ".jsonl":
        rows = [[_strip(json.loads(ln)) for ln in p.read_text().splitlines()] for p in (a, b)]
        return "modulo times" if rows[0] == rows[1] else "jsonl differs"
    if a.suffix == ".html":
        same = UUID.sub("", a.read_text()) == UUID.sub("", b.read_text())
        return "modulo times" if same else "html differs"
    if rel == "report.md":
        same = _without_wall_times(a.read_text()) == _without_wall_times(b.read_text())
        return "modulo times" if same else "report differs"
    if a.suffix == ".safetensors":
        with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
            meta = [
                {k: _json_or_text(v) for k, v in (f.metadata() or {}).items()} for f in (fa, fb)
            ]
        ta, tb = load_file(a), load_file(b)
        if ta.keys() != tb.keys() or meta[0] != meta[1]:
            return "safetensors keys or metadata differ"
        differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
        if not differ:
            return "modulo times"  # the tensors are bit-identical, only metadata times differ
        worst = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in differ)
        return f"tensors differ: {len(differ)} of {len(ta)}, max |a - b| = {worst:.3g}"
    if a.suffix == ".parquet":
        try:
            pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b))
        except AssertionError as e:
            return f"table differs: {e}"
        return "modulo times"
    return "bytes differ"


def _compare_runs(ref: Path, new: Path) -> dict[str, str]:
    files = {str(p.relative_to(r)) for r in (ref, new) for p in r.rglob("*") if p.is_file()}
    out = {}
    for rel in sorted(files):
        a, b = ref / rel, new / rel
        out[rel] = _compare_file(rel, a, b) if a.is_file() and b.is_file() else "missing"
    return out


def _broken_artifacts(root: Path) -> list[str]:
    """Files under their final names that do not parse: what a stage must never skip over.
    Inside temp entries and the trainer's own ``checkpoints/`` (kept complete by `train`'s own
    check, not by renames) a kill may leave anything; ``log.jsonl`` may end in a cut line."""
    broken = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if not p.is_file() or p.name == ".lock" or "checkpoints" in rel.parts:
            continue
        if any(is_temp_name(part) for part in rel.parts):
            continue
        try:
            if p.suffix == ".json":
                read_json(p)
            elif p.suffix == ".jsonl":
                for ln in p.read_text().splitlines()[:-1]:
                    json.loads(ln)
            elif p.suffix == ".safetensors":
                with safe_open(p, "pt") as f:
                    list(f.keys())
            elif p.suffix == ".parquet":
                pd.read_parquet(p)
        except Exception as e:  # any failure to read is the finding
            broken.append(f"{rel}: {e}")
    return broken


# ------------------------------------------------------------------------------ kill campaign
@dataclass(frozen=True)
class Kill:
    """One moment to SIGKILL the run at.

    ``how``: "before"/"after" the nth rename onto a path matching ``target`` (a glob under the
    run), "call" (the nth call of ``module:attr``), or "appears" (the plain `merit-lab` command,
    killed as soon as a path matching ``target`` that was not there before exists). Every moment
    is an event in the run, never a time: a loaded machine moves none of them to another stage.
    """

    stage: str
    how: str
    target: str
    nth: int = 1


FOLD_FIGURES = [
    "figures/fold_agreement.html",
    "figures/fold_cosine.html",
    "figures/fold_flips.html",
]
CHECKPOINT_RNG = "transformers.trainer:Trainer._save_rng_state"  # model and optimizer saved
MID_STEP = "transformers.trainer:Trainer.compute_loss"  # a step's forward pass, in process
SCHEDULE = [
    Kill("mixture", "before", "tiny/mixture.json"),
    Kill("mixture", "after", "tiny/mixture.json"),  # its timings.json entry not yet written
    Kill("gradients", "before", "gradients/parts/*.safetensors"),
    Kill("gradients", "after", "gradients/parts/*.safetensors", nth=2),
    Kill("gradients", "before", "gradients/folds.safetensors"),  # the bank's first file
    Kill("gradients", "before", "gradients/bank.safetensors"),  # its fold rows written
    Kill("gradients", "before", "gradients/bank.json"),  # its rows written, not its stage key
    Kill("gradients", "after", "gradients/bank.json"),  # before its timings.json entry
    Kill("conflict", "before", "tiny/fold_stability.json"),  # its matrices file written
    Kill("conflict", "before", "tiny/conflict.safetensors"),  # the fold stability saved
    Kill("conflict", "before", "tiny/conflict.json"),  # the space's arrays written
    Kill("partition", "before", "tiny/partition.json"),
    Kill("train", "before", "joint/ep1-s0/spec.json"),
    Kill("train", "call", CHECKPOINT_RNG, nth=2),  # checkpoint-4 cut short, checkpoint-2 whole
    Kill("train", "before", "joint/ep1-s0/.final.*.tmp/merit_branch.json"),
    Kill("train", "after", "joint/ep1-s0/final"),
    Kill("train", "appears", "branches/merit-1d/0/checkpoints/checkpoint-*"),
    Kill("train", "call", MID_STEP, nth=2),  # inside a step: 2 of the 3 runs are left
    Kill("train", "before", "branches/merit-1d/1/final"),
    Kill("train", "before", "tiny/train.json"),
    Kill("merge", "before", "merged/.merit-1d.*.tmp/mergekit.yaml"),
    Kill("merge", "after", "merged/merit-1d"),  # before its manifest is re-pointed
    Kill("merge", "before", "tiny/merge.json"),
    Kill("evaluate", "before", "eval/theta0.parquet"),
    Kill("evaluate", "after", "eval/joint-1ep.parquet"),
    Kill("evaluate", "before", "tiny/eval.parquet"),
    Kill("diagnose", "before", "diagnostics/paths.json"),
    Kill("diagnose", "appears", "diagnostics/paths.json"),  # 4 diagnostics are left
    Kill("diagnose", "before", "diagnostics/curvature.safetensors"),
    Kill("diagnose", "before", "diagnostics/gain.json"),
    Kill("report", "before", "figures/conflict_heatmap.html"),
    Kill("report", "before", "tiny/results.json"),
    Kill("report", "after", "tiny/report.md"),  # before the last timings.json
]


def _landed(run: Path, progress: Path) -> str:
    """The stage a kill landed in: the last one the hooked child entered, or (the plain command)
    the first whose artifact is missing."""
    entered = progress.read_text().split() if progress.exists() else []
    if entered:
        return entered[-1]
    missing = [s for s, done in stage_status(run).items() if not done]
    return missing[0] if missing else "report"


def _kill_once(kill: Kill, config: Path, run: Path, work: Path) -> dict:
    """Start the run (in the reference run's working directory, which ``launch.json`` records),
    SIGKILL its process group at ``kill``'s moment; what happened."""
    ready, progress, log = work / "ready", work / "progress", work / "child.log"
    ready.unlink(missing_ok=True)
    progress.unlink(missing_ok=True)
    before = set(run.glob(kill.target)) if kill.how == "appears" else set()
    if kill.how == "appears":
        proc = _start([*_merit_lab(), "run", str(config)], log, config.parent)
    else:
        args = {
            "argv": ["run", str(config)],
            "ready": str(ready),
            "progress": str(progress),
            "kill": {"how": kill.how, "target": kill.target, "nth": kill.nth},
        }
        proc = _start([sys.executable, "-c", CHILD, json.dumps(args)], log, config.parent)
    deadline = time.monotonic() + 1800  # a hang guard only: the moment is the event below
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if kill.how == "appears" and set(run.glob(kill.target)) - before:
                break
            if ready.exists():
                break
            time.sleep(0.005)
    finally:
        rc = _kill_group(proc)
    return {
        "planned": kill.stage,
        "how": f"{kill.how} {kill.target}" + (f" #{kill.nth}" if kill.nth > 1 else ""),
        "killed": rc == -signal.SIGKILL,
        "rc": rc,
        "stage": _landed(run, progress),
        "temp": [str(p.relative_to(run)) for p in find_temp(run)],
        "broken": _broken_artifacts(run),
    }


@pytest.mark.slow
def test_a_run_killed_at_every_stage_resumes_to_the_uninterrupted_result(assets, capsys):
    config, ref, run, base = assets["config"], assets["ref"], assets["run"], assets["base"]
    work = base / "campaign"
    work.mkdir()
    kills = [_kill_once(k, config, run, work) for k in SCHEDULE]
    final = _finish([*_merit_lab(), "run", str(config)], work / "final.log", cwd=base)
    log = (work / "child.log").read_text() + (work / "final.log").read_text()
    landed = [k for k in kills if k["killed"]]
    per_stage = Counter(k["stage"] for k in landed)
    with capsys.disabled():
        print(f"\nkill campaign: {len(landed)} kills; per stage {dict(per_stage)}")
        for k in kills:
            print(f"  {k['stage']:9} {k['how']:60} temp left: {len(k['temp'])}")
    assert final.returncode == 0, log[-3000:]
    missed = [k["how"] for k in kills if not k["killed"]]
    assert missed == [], f"runs that finished before their kill moment: {missed}"
    assert [k["stage"] for k in kills] == [k["planned"] for k in kills]
    assert len(landed) >= 20 and set(per_stage) == set(STAGES)
    assert {s: b for s, b in ((k["how"], k["broken"]) for k in kills) if b} == {}
    assert sum(bool(k["temp"]) for k in kills) >= 10  # most kills were inside a write
    # the finished run: no temp entry, no lock, every artifact as the uninterrupted run's
    assert RunDir(run).temp_entries() == [] and not (run / ".lock").exists()
    verdicts = _compare_runs(ref, run)
    with capsys.disabled():
        print(f"  compared with the uninterrupted run: {dict(Counter(verdicts.values()))}")
        print(
            "  not identical: "
            + ", ".join(f"{r} ({v})" for r, v in verdicts.items() if v != "identical")
        )
    bad = {r: v for r, v in verdicts.items() if v not in ("identical", "modulo times")}
    assert bad == {}
    # the fold artifacts were made, and compared like the bank: fold rows bit-identical,
    # fold_stability.json equal (it has no time field), the figures modulo plotly's div ids
    folds = [
        "gradients/folds.safetensors",
        "fold_stability.safetensors",
        "fold_stability.json",
        *FOLD_FIGURES,
    ]
    fold_verdicts = {r: verdicts.get(r) for r in folds}  # None: in neither run
    assert all(v in ("identical", "modulo times") for v in fold_verdicts.values()), fold_verdicts
    assert read_json(run / "fold_stability.json") == read_json(ref / "fold_stability.json")
    pd.testing.assert_frame_equal(
        pd.read_parquet(ref / "eval.parquet"), pd.read_parquet(run / "eval.parquet")
    )
    # a kill between a stage's artifact and its timings.json entry loses that stage's time (the
    # resumed run skips the stage): timings.json may name fewer stages, never others
    timed, ref_timed = (set(read_json(r / "timings.json")) - {"tokens_per_s"} for r in (run, ref))
    assert timed <= ref_timed
    with capsys.disabled():
        print(f"  stages without a time in timings.json: {sorted(ref_timed - timed)}")


# ---------------------------------------------------------------------------------- disk full
LIMIT = 2 << 20  # bytes per file once the bank is written: a model (2.6 MB) does not fit


def _bank_limit(ref: Path) -> int:
    """A file size limit the run first reaches in the bank's write, sized from the reference
    run: every file written before the bank (the mixture, each source's part: its row and its
    fold rows) fits; the bank's first file (``folds.safetensors``: every source's fold rows)
    does not. Returns the midpoint of the two sizes."""
    before = [ref / "config.yaml", ref / "launch.json", ref / "mixture.json"]
    parts = list((ref / "gradients" / "parts").glob("*.safetensors"))
    largest = max(p.stat().st_size for p in [*before, *parts])
    first = (ref / "gradients" / "folds.safetensors").stat().st_size
    assert len(parts) == len(SOURCES) and largest < first, (largest, first)
    return (largest + first) // 2


def _limited(limit: int):
    """The child's largest file: a write past it fails with EFBIG (SIGXFSZ ignored, so the
    write returns the error instead of killing the process), as on a full disk."""

    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    limit = limit if hard == resource.RLIM_INFINITY else min(limit, hard)

    def set_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


def _hashes(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {
        str(p.relative_to(root)): _sha(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not str(p.relative_to(root)).startswith(skip)
    }


def _run_full(config: Path, out: Path, log: Path, limit: int = LIMIT) -> tuple[int, str]:
    """`merit-lab run` with files limited to ``limit`` bytes: its exit code and its output."""
    log.write_text("")
    cmd = [*_merit_lab(), "run", str(config), "--output-dir", str(out)]
    proc = _start(cmd, log, preexec_fn=_limited(limit))
    try:
        proc.wait(timeout=240)
    finally:
        _kill_group(proc)
    return proc.returncode, log.read_text()


def _assert_one_space_error(rc: int, output: str, written: Path) -> None:
    errors = [ln for ln in output.splitlines() if "merit-lab: error:" in ln]
    assert rc == 2 and "Traceback" not in output, output[-3000:]
    assert len(errors) == 1, output[-3000:]
    message = errors[0].split("merit-lab: error: ")[1]  # after a progress bar's \r, maybe
    expected = f"ran out of space writing {written}: File too large (the file size limit). "
    assert message.startswith(expected + "Free some space and run the same command again"), message


@pytest.mark.slow
def test_a_full_disk_fails_with_one_line_keeps_what_was_written_and_resumes(assets):
    config, base, ref = assets["config"], assets["base"], assets["ref"]
    out, log = base / "full", base / "full.log"
    run = out / "tiny"
    ok = [*_merit_lab(), "run", str(config), "--output-dir", str(out)]

    # the bank cannot be written (its first file, the fold rows: 16 MiB); the mixture and each
    # source's part (its row and fold rows: 5 MiB) were
    rc, output = _run_full(config, out, log, _bank_limit(ref))
    _assert_one_space_error(rc, output, run / "gradients" / "folds.safetensors")
    assert (
        read_json(run / "mixture.json")["sources"] and len(list(run.glob("gradients/parts/*"))) == 4
    )
    bank = ["folds.safetensors", "bank.safetensors", "bank.json"]
    assert [f for f in bank if (run / "gradients" / f).exists()] == [] and find_temp(run) == []
    assert _finish([*ok, "--until", "partition"], log).returncode == 0, log.read_text()[-3000:]

    # a training checkpoint (the model: 2.6 MB) cannot be written
    analysis = _hashes(run, skip=("config.yaml",))
    rc, output = _run_full(config, out, log)
    ckpt = run / "joint" / "ep1-s0" / "checkpoints" / "checkpoint-2" / "model.safetensors"
    _assert_one_space_error(rc, output, ckpt)
    assert _hashes(run, skip=("joint", "branches", "config.yaml")) == analysis
    assert _finish([*ok, "--until", "train"], log).returncode == 0, log.read_text()[-3000:]
    assert not ckpt.parent.exists()  # the cut checkpoint was removed, training resumed

    # the merged model cannot be written; every branch stays as trained
    trained = _hashes(run, skip=("merged", "config.yaml", "timings.json"))
    rc, output = _run_full(config, out, log)
    _assert_one_space_error(rc, output, run / "merged" / "merit-1d" / "model.safetensors")
    assert _hashes(run, skip=("merged", "config.yaml", "timings.json")) == trained
    assert not (run / "merged" / "merit-1d").exists() and find_temp(run) == []
    assert not (run / ".lock").exists()

    # space freed: the run completes as an uninterrupted one
    assert _finish(ok, log).returncode == 0, log.read_text()[-3000:]
    assert RunDir(run).temp_entries() == []
    finals = [str(p.relative_to(ref)) for p in ref.glob("**/final/model.safetensors")]
    weights = [
        "gradients/bank.safetensors",
        "gradients/folds.safetensors",
        "merged/merit-1d/model.safetensors",
        *finals,
    ]
    assert len(weights) == 6
    for rel in weights:
        assert _compare_file(rel, ref / rel, run / rel) in ("identical", "modulo times"), rel
    assert read_json(run / "fold_stability.json") == read_json(ref / "fold_stability.json")
    pd.testing.assert_frame_equal(
        pd.read_parquet(ref / "eval.parquet"), pd.read_parquet(run / "eval.parquet")
    )


# -------------------------------------------------------------------------------- two writers
@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_first(assets, caplog):
    """Two `merit-lab run` on one run directory, then a notebook's calls beside the CLI, then the
    CLI beside a notebook: the second writer is refused, naming the first (pid, host, command)."""
    config, base = assets["config"], assets["base"]
    out = base / "two"
    shutil.copytree(assets["ref"], out / "tiny")  # a finished run: only the report is redone
    run = RunDir(out / "tiny")
    argv = ["run", str(config), "--output-dir", str(out)]
    work = base / "two-work"
    work.mkdir()
    ready, log = work / "ready", work / "first.log"
    args = {
        "argv": argv,
        "ready": str(ready),
        "progress": str(work / "progress"),
        "kill": {"how": "before", "target": "tiny/report.md", "nth": 1},
    }
    first = _start([sys.executable, "-c", CHILD, json.dumps(args)], log)
    try:
        deadline = time.monotonic() + 1800  # a hang guard: the whole run comes first
        while not ready.exists():  # the first writer holds the lock, inside the report's write
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        holder = read_json(run.lock)
        assert holder["pid"] == first.pid and holder["command"] == shlex.join(["merit-lab", *argv])
        before = _hashes(run.root)
        second = subprocess.run(
            [*_merit_lab(), *argv], env=ENV, capture_output=True, text=True, timeout=600
        )
        errors = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(errors) == 1, second.stderr[-3000:]
        for part in [
            "merit-lab: error: ",
            str(run.root),
            f"pid {first.pid} ",
            holder["host"],
            f"(command: {holder['command']!r})",
            f"kill {first.pid}",
        ]:
            assert part in errors[0], (part, errors[0])

        # a notebook (this process) calling what notebooks 02-04 call to write the run
        cfg = load_config(config, output_dir=str(out))
        calls = {
            "run_pipeline": lambda: run_pipeline(cfg, until="partition"),
            "train_experiments": lambda: train_experiments(cfg),
            "merge_rows": lambda: merge_rows(cfg),
            "evaluate_rows": lambda: evaluate_rows(cfg, progress=False),
            "run_diagnostics": lambda: run_diagnostics(run.root, progress=False),
            "EditSession.save": lambda: load_edit_session(run.root).save(),
        }
        for name, call in calls.items():
            with pytest.raises(LockHeldError) as err:
                call()
            assert f"pid {first.pid} on host {holder['host']!r}" in str(err.value), name
            assert holder["command"] in str(err.value), name
        assert _hashes(run.root) == before  # nothing written, the first writer's temp untouched
    finally:
        _kill_group(first)

    # the first writer killed: a notebook's write takes its lock over (with a warning) ...
    with caplog.at_level(logging.WARNING, logger="merit_lab.io"):
        load_edit_session(run.root).save()
    assert f"taking over the lock of pid {first.pid}" in caplog.text and not run.lock.exists()
    # ... and while a notebook writes, the CLI is refused, naming it
    with run.writer_lock(command="notebook 04: editor.save()"):
        second = subprocess.run(
            [*_merit_lab(), *argv], env=ENV, capture_output=True, text=True, timeout=600
        )
    assert second.returncode == 2 and f"pid {os.getpid()} " in second.stderr
    assert "(command: 'notebook 04: editor.save()')" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
