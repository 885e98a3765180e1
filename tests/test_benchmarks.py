"""The benchmark harness measures what it says, and every benchmark still runs (quick sizes).

Nothing here asserts a speed: speed is what `make bench` reports. These tests keep the
benchmarks from rotting and check the measuring tools against known quantities.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from benchmarks import run_all
from benchmarks.common import Figure, Results, command_peak, in_child, print_table


def _allocate(n_bytes: int) -> int:
    a = np.ones(n_bytes // 8)  # touched pages: all of it is resident
    return int(a.nbytes)


def test_in_child_peak_rss_sees_an_allocation_and_not_the_parent():
    ballast = np.ones(40_000_000)  # 320 MB in the parent must not count
    out, seconds, peak = in_child(_allocate, 200 * 2**20)
    assert out == 200 * 2**20
    assert seconds >= 0
    assert 0.95 * 200 * 2**20 <= peak < 260 * 2**20
    del ballast


def test_command_peak_reports_the_command_s_own_memory():
    seconds, peak, out = command_peak(
        [sys.executable, "-c", "x = bytearray(150 * 2**20); print('done')"]
    )
    assert "done" in out and seconds > 0
    assert 150 * 2**20 <= peak < 300 * 2**20
    with pytest.raises(RuntimeError, match="exited 3"):
        command_peak([sys.executable, "-c", "import sys; sys.exit(3)"])


def test_figures_compare_against_their_targets(capsys):
    res = Results("x")
    assert res.add("s", "a", 0.93, "×", target=(">=", 0.9)).ok is True
    assert res.add("s", "b", 0.006, target=("<=", 0.005)).ok is False
    assert res.add("s", "c", math.nan, target=("<=", 1.0)).ok is False
    assert res.add("s", "d", 12.0, "s").ok is None
    with pytest.raises(ValueError, match="unknown target op"):
        res.add("s", "e", 1.0, target=("~", 1.0))
    print_table([res])
    table = capsys.readouterr().out
    assert "MISSED" in table and " ok" in table
    assert [f["ok"] for f in res.to_dict()["figures"]] == [True, False, False, None]
    assert Figure("s", "x", 1.0).to_dict()["ok"] is None
    skipped = res.skip("s", "peer", "not installed")
    assert skipped.ok is None and skipped.to_dict()["skipped"] is True


@pytest.mark.slow
def test_every_benchmark_runs_in_quick_mode(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert run_all.main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert not data["failed"]
    assert {r["bench"] for r in data["results"]} == set(run_all.BENCHES)
    for r in data["results"]:
        assert r["figures"], f"{r['bench']} reported no figures"
        for f in r["figures"]:
            assert math.isfinite(f["value"]) or (f["skipped"] and f["note"]), f
    assert "targets missed" in capsys.readouterr().out
