"""The conflict benchmark's bank cache: streamed to disk as a loadable `GradientBank` equal to
the in-memory generator, and refused before any write when the disk lacks room."""

from __future__ import annotations

import shutil
from collections import namedtuple

import numpy as np
import pytest

from benchmarks import bench_conflict
from merit_lab.gradients.bank import GradientBank


def test_streamed_bank_loads_and_equals_the_generator(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_conflict, "BANK_ROOT", tmp_path)
    monkeypatch.setattr(bench_conflict, "_ROW_CHUNK", 7)  # several blocks, the last one short
    folder = bench_conflict.ensure_bank(30, 256, seed=3)
    rows, names, examples, _ = bench_conflict.make_bank(30, 256, seed=3)
    bank = GradientBank.load(folder, mmap=True)
    np.testing.assert_array_equal(bank.rows, rows)
    assert list(bank.names) == names
    assert {n: s["examples"] for n, s in bank.stats.items()} == examples
    (folder / "bank.safetensors").write_bytes(b"")  # a reused bank is not rewritten
    assert bench_conflict.ensure_bank(30, 256, seed=3) == folder
    assert (folder / "bank.safetensors").stat().st_size == 0


def test_too_little_disk_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_conflict, "BANK_ROOT", tmp_path / "banks")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**12, 0, 5 * 2**30))
    with pytest.raises(RuntimeError, match=r"refusing to write the 10\.5 GB synthetic bank"):
        bench_conflict.ensure_bank(10_000, 2**18)
    assert list((tmp_path / "banks").iterdir()) == []
