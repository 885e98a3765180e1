"""The benchmark harness measures what it says, and every benchmark still runs (quick sizes).

Nothing here asserts a speed: speed is what `make bench` reports. These tests keep the
benchmarks from rotting and check the measuring tools against known quantities.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import run_all
from benchmarks.common import (
    Figure,
    Results,
    cached_fraction,
    command_memory,
    command_peak,
    drop_page_cache,
    in_child,
    print_table,
)


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


# The command holds its memory until the sampler (its parent) has gone round its loop 30 more
# times (each round sleeps once: a voluntary context switch in /proc/<ppid>/status), so the
# samples that see the memory are counted, not guessed from a sleep on a loaded machine.
SAMPLED = """
import os, time
def rounds():
    with open(f"/proc/{os.getppid()}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("voluntary_ctxt_switches"))
start = rounds()
while rounds() < start + 30:
    time.sleep(0.001)
"""


def test_command_memory_splits_anonymous_and_file_backed_rss_for_the_merge_rounds(tmp_path):
    # bench_merge's mergekit rounds: heap memory counts as anonymous, a mapped file as file-backed
    anon = command_memory([sys.executable, "-c", "x = bytearray(150 * 2**20)\n" + SAMPLED])
    assert anon.seconds > 0 and anon.samples > 10
    assert 150 * 2**20 <= anon.peak_anon < 200 * 2**20 and anon.peak_file < 60 * 2**20
    assert anon.peak_anon + anon.peak_file <= 1.05 * anon.max_rss
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * (100 * 2**20))
    code = (
        "import mmap, sys, time; f = open(sys.argv[1], 'rb'); "
        "m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); "
        "s = sum(m[i] for i in range(0, len(m), 4096))\n" + SAMPLED
    )
    mapped = command_memory([sys.executable, "-c", code, str(blob)])
    assert 100 * 2**20 <= mapped.peak_file < 160 * 2**20 and mapped.peak_anon < 60 * 2**20
    assert mapped.peak_rss_sampled <= 1.05 * mapped.max_rss
    with pytest.raises(RuntimeError, match="exited 3"):
        command_memory([sys.executable, "-c", "import sys; sys.exit(3)"])


def test_page_cache_drop_for_the_cold_merge_rounds(tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(b"y" * (16 * 2**20))
    blob.read_bytes()
    if cached_fraction([blob]) < 0.9:
        pytest.skip("this filesystem did not keep the file in the page cache")
    drop_page_cache([blob])
    left = cached_fraction([blob])
    if left > 0.5 and _is_tmpfs(tmp_path):
        pytest.skip("tmpfs keeps its pages: nothing to drop")
    assert left < 0.05
    blob.read_bytes()
    assert cached_fraction([blob]) > 0.9


def _is_tmpfs(path) -> bool:
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    best = max((m for m in mounts if str(path).startswith(m[1])), key=lambda m: len(m[1]))
    return best[2] == "tmpfs"


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


@pytest.mark.slow
def test_bench_gpu_tiny_writes_every_field(tmp_path):
    """`python -m benchmarks.bench_gpu --tiny` on the CPU: the same code as on a card, every
    field of the JSON present and sane. No speed is asserted (the rates need only be positive;
    on a shared CPU a round of a 1M-parameter model is noise), and no GPU memory off CUDA."""
    from benchmarks import bench_gpu

    out = tmp_path / "gpu.json"
    argv = ["--tiny", "--device", "cpu", "--out", str(out), "--workdir", str(tmp_path / "w")]
    assert bench_gpu.main(argv) == 0
    data = json.loads(out.read_text())
    m = data["machine"]
    assert m["device"] == "cpu" and m["gpu"] is None and m["date"] and m["torch"]
    assert "cuda_version" in m and m["transformers"]
    assert data["tiny"] is True and data["rounds"] == 3
    assert data["anchor"]["tokens_per_s"] == 28000 and "not our setup" in data["anchor"]["note"]
    scaling = data["multi_gpu"]  # --tiny on the CPU: 1 and 2 worker processes
    assert scaling["workers"] == [1, 2] and scaling["tokens"] > 0
    assert all(w > 0 for w in scaling["wall_s"]) and scaling["speedup"] > 0
    assert scaling["bank_max_rel_diff"] < 1e-5  # 2 vs 1 CPU threads per worker: summation order
    assert [len(v) for v in scaling["worker_tokens_per_s"].values()] == [1, 2]
    (size,) = data["sizes"].values()
    assert 0.5e6 < size["parameters"] < 2e6
    for dtype, g in (("bfloat16", size["bf16"]), ("float32", size["fp32"])):
        assert g["dtype"] == dtype and g["tokens"] > 0
        assert g["stage_tokens_counted_by_stage"] in (None, g["tokens"])
        for side in ("plain", "stage"):
            assert len(g[side]["seconds"]) == 3 and all(t > 0 for t in g[side]["seconds"])
            assert 0 < g[side]["rate_min"] <= g[side]["rate"] <= g[side]["rate_max"]
        assert g["ratio"] == pytest.approx(g["stage"]["rate"] / g["plain"]["rate"])
        assert 0 < g["ratio"] < math.inf and all(r > 0 for r in g["ratio_per_round"])
        assert g["sketch_step"]["median_s"] > 0 and 0 < g["sketch_share"] < math.inf
        assert g["peak_bytes"] == {"plain": None, "stage": None, "sketch": None}
        assert math.isfinite(g["loss_mean"]) and g["loss_mean"] > 0
    mg = size["merge"]
    assert mg["k"] == 2 and mg["bytes_written"] > 0 and mg["bytes_read"] >= 2 * mg["bytes_written"]
    assert mg["merge_median_s"] > 0 and mg["floor_median_s"] > 0 and mg["ratio"] > 0
    assert not (tmp_path / "w" / "tiny").exists()  # the checkpoints are cleaned up
    names = {f["name"] for f in data["results"][0]["figures"]}
    assert {"stage ÷ plain fwd+bwd", "merge time ÷ disk floor"} <= names
    # bench_conflict's rows, --quick sizes: the out-of-core ladder beside the matmul rate
    conflict = [f for f in data["results"][0]["figures"] if f["section"].startswith("conflict")]
    assert any("÷ the matmul rate" in f["name"] for f in conflict)
    assert [r["t"] for r in data["conflict"]["ladder"]] == [24, 64, 200]
    assert all(f["target"] is None for f in data["results"][0]["figures"])  # --tiny: no targets


def test_bench_call_price_predicts_the_stage_from_its_batches_by_hand():
    """`bench_call_price.predict` on one source of lengths 100 and seven 10s (batches of at most
    8) at 1 s a call and 0.01 s a padded token: without folds priced at 100, the 100 alone and
    the seven 10s (2 calls, 170 tokens: 3.7 s); with 4 folds dealt by example, the fold of 100
    and a 10 in one batch (200) and three folds of two 10s (4 calls, 260 tokens: 6.6 s); the
    fewest batches without folds one batch padded to 800 (1 call: 9 s)."""
    from benchmarks.bench_call_price import predict

    fit = {"fixed_s": 1.0, "per_token_s": 0.01}
    lengths = [[100, 10, 10, 10, 10, 10, 10, 10]]
    for folds, price, want in ((1, 100, (2, 170)), (4, 100, (4, 260)), (1, None, (1, 800))):
        got = predict(lengths, 8, fit, folds, price)
        assert (got["calls"], got["padded"]) == want
        assert got["seconds"] == pytest.approx(want[0] + 0.01 * want[1])
