from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from merit_lab.cli import main
from merit_lab.config.schema import load_config
from merit_lab.gradients.bank import GradientBank
from merit_lab.io import read_json
from merit_lab.partition.plan import Partition
from merit_lab.pipeline import load_source_table, make_partition, run_pipeline

ANALYSIS = ["mixture", "gradients", "conflict", "partition"]


def _config(tmp_path: Path, **extra) -> Path:
    cfg = {
        "name": "t",
        "model": "demo",
        "mixture": "demo",
        "output_dir": str(tmp_path / "runs"),
        "device": "cpu",
        "calibration": {"n": 8, "micro_batch_size": 8},
        "sketch": {"kind": "countsketch", "dim": 4096, "seed": 0},
        "partition": {"method": "balanced", "r": 2},
        **extra,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> tuple[Path, str]:
    """`merit-lab run --until partition` of `_config` (the demo, n = 8, a 4096-wide sketch) from
    nothing, once, and what it printed; each test works on a copy of it (`_copy`)."""
    base = tmp_path_factory.mktemp("analysed")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["run", str(_config(base)), "--until", "partition"]) == 0
    return base / "runs", printed.getvalue()


def _copy(analysed, tmp_path: Path) -> None:
    """The shared run, copied to where `_config(tmp_path)` puts it (tests may change the copy)."""
    shutil.copytree(analysed[0], tmp_path / "runs")


def test_cli_run_writes_the_run_directory_and_resumes(tmp_path: Path, capsys, analysed):
    made, out = analysed
    assert f"wrote {(made / 't').resolve()}" in out
    cfg = _config(tmp_path)
    _copy(analysed, tmp_path)
    run = tmp_path / "runs" / "t"
    for f in [
        "config.yaml",
        "mixture.json",
        "gradients/bank.safetensors",
        "gradients/bank.json",
        "conflict.json",
        "partition.json",
    ]:
        assert (run / f).exists(), f
    bank = GradientBank.load(run / "gradients")
    from merit_lab.merging.stream import fingerprint_checkpoint
    from merit_lab.models.loading import resolve_model_path

    # The bank names θ0 the way trained branches do, so a merge can check both against it.
    assert bank.info["model"] == fingerprint_checkpoint(resolve_model_path("demo"))
    mixture = read_json(run / "mixture.json")
    assert bank.rows.shape == (len(mixture["sources"]), 4096)
    part = Partition.load(run / "partition.json")
    assert part.k == 4
    assert sorted(n for g in part.groups for n in g) == sorted(bank.names)
    assert sum(part.weights) == pytest.approx(1.0)
    # the run's one size unit: train response tokens (what the loss averages over)
    tokens = {s["name"]: s["train_response_tokens"] for s in mixture["sources"]}
    assert all(0 < tokens[s["name"]] < s["train_tokens"] for s in mixture["sources"])
    expected = [sum(tokens[n] for n in g) / sum(tokens.values()) for g in part.groups]
    np.testing.assert_allclose(part.weights, expected)

    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert main(["run", str(cfg), "--until", "partition"]) == 0  # current: nothing is rewritten
    changed = [
        p for p, t in stamps.items() if p.stat().st_mtime_ns != t and p.name != "config.yaml"
    ]
    assert changed == []

    assert main(["show", str(run)]) == 0
    shown = capsys.readouterr().out
    assert "partition: balanced, K=4" in shown and "4096 countsketch sketch" in shown
    from merit_lab.pipeline import STAGES, stage_status

    status = stage_status(run)
    assert list(status) == list(STAGES)
    assert all(status[s] for s in ANALYSIS) and not any(status[s] for s in list(STAGES)[4:])
    table = load_source_table(run)
    assert set(table["group"]) == {"G0", "G1", "G2", "G3"}


def test_changed_partition_setting_redoes_only_the_partition(tmp_path: Path, analysed):
    _copy(analysed, tmp_path)
    run = run_pipeline(load_config(_config(tmp_path)), until="partition")
    bank_time = (run.gradients / "bank.safetensors").stat().st_mtime_ns
    from merit_lab.pipeline import stage_status

    (run.partition).unlink()
    assert stage_status(run.root)["partition"] is False and stage_status(run.root)["conflict"]
    cfg = load_config(_config(tmp_path, partition={"method": "random", "k": 3, "seed": 1}))
    run_pipeline(cfg, ANALYSIS)
    assert (run.gradients / "bank.safetensors").stat().st_mtime_ns == bank_time
    assert Partition.load(run.partition).k == 3


def test_bad_config_and_k_larger_than_sources(tmp_path: Path, capsys, analysed):
    _copy(analysed, tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncalibraton: {n: 3}\n")
    assert main(["run", str(bad)]) == 2
    assert "unknown keys ['calibraton']" in capsys.readouterr().err
    run = run_pipeline(load_config(_config(tmp_path)), ["mixture", "gradients", "conflict"])
    from merit_lab.analysis.conflict import ConflictSpace

    space = ConflictSpace.load(run.conflict)
    n = len(space.names)
    with pytest.raises(ValueError, match="K"):
        make_partition(space, dict.fromkeys(space.names, 1), dict.fromkeys(space.names, 1), k=n + 1)


def test_public_api_resolves():
    import merit_lab

    for name in merit_lab.__all__:
        assert getattr(merit_lab, name) is not None, name
    with pytest.raises(AttributeError):
        merit_lab.no_such_name  # noqa: B018


def test_cli_train_branch_help(capsys):
    from merit_lab.cli import build_parser

    args = build_parser().parse_args(["launch", "a.json", "b.json", "--mode", "local"])
    assert args.specs == ["a.json", "b.json"] and args.mode == "local"
    with pytest.raises(SystemExit):
        main(["train-branch", "--help"])
    assert "spec.json" in capsys.readouterr().out
