"""conflict.json (the small envelope) + conflict.safetensors (the (T, T) and (T, R) arrays):
bit-for-bit round trip, version-1 files with inline arrays, cut or missing arrays, the conflict
stage's writes and resume, and a T = 3,000 space through the report without a (T, T) JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file

from merit_lab.analysis.conflict import ConflictSpace, compute_conflict_space
from merit_lab.config.schema import config_hash, load_config
from merit_lab.io import read_json
from merit_lab.pipeline import run_pipeline
from merit_lab.pipeline.layers import partition_view
from merit_lab.pipeline.rundir import RunDir
from tests.test_pipeline import _config as pipeline_config


def _space(t: int = 12, d: int = 40, seed: int = 0, axes: int | None = None) -> ConflictSpace:
    rows = np.random.default_rng(seed).normal(size=(t, d)).astype(np.float32)
    return compute_conflict_space(rows, [f"s{i:04d}" for i in range(t)], axes=axes)


def _same(a: ConflictSpace, b: ConflictSpace) -> None:
    assert a.names == b.names and a.order == b.order
    for f in ("cosine", "eigenvalues", "embedding", "explained_variance_ratio"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype == np.float64 and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), f  # bit for bit


@pytest.mark.parametrize("axes", [None, 3])
def test_round_trip_is_bit_for_bit_and_the_arrays_are_in_safetensors(tmp_path, axes):
    space = _space(axes=axes)
    path = space.save(tmp_path / "conflict.json", {"bank_key": "k1"})
    doc = read_json(path)
    assert (doc["format"], doc["version"], doc["bank_key"]) == ("merit-lab/conflict", 2, "k1")
    assert "cosine" not in doc and "embedding" not in doc
    assert doc["arrays"]["file"] == "conflict.safetensors"
    assert doc["arrays"]["shapes"]["embedding"] == [12, 12 if axes is None else 3]
    back = ConflictSpace.load(path)
    _same(space, back)
    with pytest.raises(ValueError, match="conflict.json: the arrays are in a file beside it"):
        ConflictSpace.from_dict(doc, source=path)  # the inline reader refuses version 2
    assert not back.cosine.flags.writeable and not back.embedding.flags.writeable
    # an independent reader (the safetensors library) sees the same float64 arrays
    tensors = load_file(tmp_path / "conflict.safetensors")
    assert tensors["cosine"].tobytes() == space.cosine.tobytes()
    assert tensors["embedding"].tobytes() == space.embedding.tobytes()
    t, r = space.embedding.shape
    header = int.from_bytes((tmp_path / "conflict.safetensors").read_bytes()[:8], "little")
    assert header % 8 == 0  # the data starts 8-byte aligned
    assert (tmp_path / "conflict.safetensors").stat().st_size == 8 + header + 8 * (t * t + t * r)
    # saving the loaded (memory-mapped) space again writes the same bytes
    again = back.save(tmp_path / "again" / "conflict.json", {"bank_key": "k1"})
    assert read_json(again) == doc
    assert (tmp_path / "again" / "conflict.safetensors").read_bytes() == (
        tmp_path / "conflict.safetensors"
    ).read_bytes()


def _version_1(space: ConflictSpace, **extra) -> dict:
    """conflict.json as merit-lab wrote it before version 2: every array inline (built by hand)."""
    return {
        "format": "merit-lab/conflict",
        "version": 1,
        "names": list(space.names),
        "cosine": space.cosine.tolist(),
        "eigenvalues": space.eigenvalues.tolist(),
        "embedding": space.embedding.tolist(),
        "explained_variance_ratio": space.explained_variance_ratio.tolist(),
        "order": list(space.order),
        **extra,
    }


def test_a_version_1_file_with_inline_arrays_loads(tmp_path):
    space = _space(seed=1)
    path = tmp_path / "conflict.json"
    path.write_text(json.dumps(_version_1(space, bank_key="old"), indent=2))
    _same(space, ConflictSpace.load(path))  # JSON floats round-trip exactly
    assert not (tmp_path / "conflict.safetensors").exists()
    _same(space, ConflictSpace.from_dict(space.to_dict()))  # drift.json's inline form


def test_missing_cut_or_foreign_arrays_give_one_error_naming_the_file(tmp_path):
    path = _space(seed=2).save(tmp_path / "conflict.json")
    arrays = tmp_path / "conflict.safetensors"
    good = arrays.read_bytes()
    cases = [
        (good[:-8], "cut short"),
        (good[:5], "not a readable safetensors file"),
        (b"\xff" * 8 + good[8:], "not a readable safetensors file"),
    ]
    for data, match in cases:
        arrays.write_bytes(data)
        with pytest.raises(ValueError, match=match) as err:
            ConflictSpace.load(path)
        assert str(arrays) in str(err.value) and "run the conflict stage again" in str(err.value)
    _space(seed=3).save(tmp_path / "other.json")  # the same shapes, another space
    shutil.copyfile(tmp_path / "other.safetensors", arrays)
    with pytest.raises(ValueError, match="written by another save than conflict.json"):
        ConflictSpace.load(path)
    arrays.unlink()
    with pytest.raises(ValueError, match=f"{arrays} is missing"):
        ConflictSpace.load(path)


def _config(tmp_path: Path, seed: int = 0) -> Path:
    """`tests/test_pipeline.py`'s demo analysis config with a 1024-wide sketch of ``seed``."""
    return pipeline_config(tmp_path, sketch={"kind": "countsketch", "dim": 1024, "seed": seed})


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> Path:
    """The demo analysed up to the partition once (n = 8, a 1024-wide sketch)."""
    base = tmp_path_factory.mktemp("conflict_files")
    run_pipeline(load_config(_config(base)), until="partition")
    return base


ARTIFACTS = ["mixture.json", "gradients/bank.safetensors", "gradients/bank.json"]
ARTIFACTS += ["conflict.safetensors", "conflict.json", "partition.json"]


def _stamps(run: Path) -> dict[str, int]:
    """The analysis artifacts' mtimes (config.yaml is rewritten by every run)."""
    return {f: (run / f).stat().st_mtime_ns for f in ARTIFACTS if (run / f).is_file()}


def test_the_stage_writes_both_files_and_a_rerun_skips(analysed, tmp_path):
    shutil.copytree(analysed / "runs", tmp_path / "runs")
    run = RunDir(tmp_path / "runs" / "t")
    assert run.conflict.is_file() and run.conflict_arrays.is_file()
    space = run.load_space()
    bank = run.load_bank()
    u = bank.rows / np.linalg.norm(bank.rows, axis=1, keepdims=True)
    np.testing.assert_allclose(space.cosine, u @ u.T, atol=1e-6)  # the bank's cosines
    assert read_json(run.conflict)["bank_key"] == run.stored_key("gradients")
    before = _stamps(run.root)
    run_pipeline(load_config(_config(tmp_path)), until="partition")
    assert _stamps(run.root) == before  # current: nothing rewritten
    run.conflict_arrays.unlink()  # a lost arrays file redoes the stage, not a later failure
    run_pipeline(load_config(_config(tmp_path)), ["conflict"])
    assert (
        run.conflict_arrays.is_file() and run.conflict.stat().st_mtime_ns != before["conflict.json"]
    )
    _same(space, run.load_space())
    # a changed bank (another sketch seed) redoes the conflict stage and the partition
    run_pipeline(load_config(_config(tmp_path, seed=1)), until="partition")
    assert (
        read_json(run.conflict)["bank_key"]
        == run.stored_key("gradients")
        != (read_json(analysed / "runs" / "t" / "conflict.json")["bank_key"])
    )
    assert np.abs(run.load_space().cosine - space.cosine).max() > 1e-3
    after = _stamps(run.root)
    assert all(after[f] != before[f] for f in ("conflict.json", "partition.json"))


def test_an_old_run_with_a_version_1_conflict_json_is_not_redone(analysed, tmp_path):
    """An old run: conflict.json with inline arrays and the partition keyed on that file (as
    the partition stage keyed it then): a re-run redoes neither, and the space loads."""
    shutil.copytree(analysed / "runs", tmp_path / "runs")
    run = RunDir(tmp_path / "runs" / "t")
    space, doc = run.load_space(), read_json(run.conflict)
    old = _version_1(space, bank_key=doc["bank_key"])
    run.conflict.write_text(json.dumps(old, indent=2) + "\n")
    run.conflict_arrays.unlink()
    cfg = load_config(_config(tmp_path))
    part = read_json(run.partition)
    part["params"]["stage_key"] = config_hash(
        partition_view(cfg.partition), config_hash(old), run.stored_key("mixture")
    )
    run.partition.write_text(json.dumps(part, indent=2) + "\n")
    before = _stamps(run.root)
    run_pipeline(cfg, until="partition")
    assert _stamps(run.root) == before and not run.conflict_arrays.exists()
    _same(space, run.load_space())


def test_a_3000_source_space_goes_through_the_files_and_the_report_section(tmp_path):
    """T = 3,000 (d = 64; the top 16 axes): conflict.json stays small (no (T, T) or (T, R)
    list in any JSON) and the report's conflict section draws from the mapped arrays."""
    from merit_lab.pipeline.report import conflict_space_section
    from merit_lab.viz.plots_heatmap import MAX_CELLS

    t = 3000
    rows = np.random.default_rng(4).normal(size=(t, 64)).astype(np.float32)
    rows[: t // 2] += 2 * rows[0]  # two camps
    space = compute_conflict_space(rows, [f"source-{i:04d}" for i in range(t)])
    assert space.embedding.shape == (t, 16)
    path = space.save(tmp_path / "conflict.json")
    assert path.stat().st_size < 200_000  # names, order, 16 eigenvalues: ~0.1 MB
    assert (tmp_path / "conflict.safetensors").stat().st_size > 8 * t * t
    back = ConflictSpace.load(path)
    _same(space, back)
    figures = {}

    def figure(fig, stem):
        figures[stem] = fig
        return f"![{stem}]({stem}.png)"

    table = _table(back.names)
    ctx = SimpleNamespace(run=RunDir(tmp_path), sources=table, figure=figure)
    lines = conflict_space_section(ctx)
    assert lines[0] == "## Conflict space"
    pc1 = f"PC1 {back.explained_variance_ratio[0]:.1%}"
    assert pc1 in lines[2]
    heat = figures["conflict_heatmap"].data[0]
    assert np.shape(heat.z)[0] <= MAX_CELLS and np.shape(heat.z)[1] <= MAX_CELLS
    assert max(len(f.to_json()) for f in figures.values()) < 8 * t * t / 10


def _table(names):
    import pandas as pd

    return pd.DataFrame({"group": ["G0", "G1"] * (len(names) // 2)}, index=list(names))


def test_show_prints_the_off_diagonal_cosine_range_block_by_block(analysed, tmp_path):
    """`merit-lab show` reads the range 256 rows at a time: the demo's 32 sources, then 600
    (three blocks, the diagonal skipped in each) against the whole matrix at once."""
    from merit_lab.pipeline.runner import run_summary

    shutil.copytree(analysed / "runs", tmp_path / "runs")
    run = RunDir(tmp_path / "runs" / "t")
    for space in (run.load_space(), _space(t=600, d=8, seed=5)):
        space.save(run.conflict)
        off = space.cosine[~np.eye(space.n_sources, dtype=bool)]
        assert f"T={space.n_sources}, cosine range [{off.min():.2f}, {off.max():.2f}]" in (
            run_summary(run.root)
        )
