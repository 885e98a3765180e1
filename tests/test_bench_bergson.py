"""The bergson side-by-side benchmark: its pure parts against hand-worked numbers, its venv
handling, and (where ``.bench/bergson-venv`` was built: CI does not build it) a --quick run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import bench_bergson as bg
from benchmarks.common import Results, print_table


def test_projection_side_puts_the_total_width_nearest_2_18():
    # demo base: 21 decoder Linear modules; 21·111² = 258,741 (3,403 short), 21·112² = 263,424
    # (1,280 over)
    assert bg.projection_side(21) == 112
    # SmolLM2-135M: 210 modules; 210·35² = 257,250 (4,894 short), 210·36² = 272,160 (10,016 over)
    assert bg.projection_side(210) == 35
    # Qwen2.5-0.5B: 168 modules; 168·39² = 255,528 (6,616 short) beats 168·40² (6,656 over)
    assert bg.projection_side(168) == 39
    assert bg.projection_side(1, 16) == 4 and bg.projection_side(4, 1) == 1
    with pytest.raises(ValueError, match="n_modules"):
        bg.projection_side(0)


def test_cosines_and_sums_per_source_by_hand():
    c = bg.cosine_matrix(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]))
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(c, [[1, r, 0], [r, 1, r], [0, r, 1]], atol=1e-15)
    with pytest.raises(ValueError, match="all zeros"):
        bg.cosine_matrix(np.array([[1.0, 0.0], [0.0, 0.0]]))
    rows = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=np.float32)
    np.testing.assert_array_equal(bg.sum_by_source(rows, [1, 0, 1], 2), [[3, 4], [6, 8]])
    with pytest.raises(ValueError, match="source_of"):
        bg.sum_by_source(rows, [0, 2, 1], 2)
    with pytest.raises(ValueError, match="source_of"):
        bg.sum_by_source(rows, [0, 1], 2)


def _sym(pairs: list[float]) -> np.ndarray:
    """A 3 x 3 matrix with ones on the diagonal and pairs (01, 02, 12) off it."""
    a, b, c = pairs
    return np.array([[1.0, a, b], [a, 1.0, c], [b, c, 1.0]])


def test_cosine_agreement_reads_the_off_diagonal_only():
    # y = 2x: Pearson 1, max |diff| = |0.6 - 0.3|; the diagonals (equal) do not count
    got = bg.cosine_agreement(_sym([0.1, 0.2, 0.3]), _sym([0.2, 0.4, 0.6]))
    assert got["pearson"] == pytest.approx(1.0) and got["max_abs_diff"] == pytest.approx(0.3)
    # reversed: Pearson -1, max |diff| = |0.1 - 0.3|
    got = bg.cosine_agreement(_sym([0.1, 0.2, 0.3]), _sym([0.3, 0.2, 0.1]))
    assert got["pearson"] == pytest.approx(-1.0) and got["max_abs_diff"] == pytest.approx(0.2)
    # x = (0, 1, 2), y = (0, 2, 1): cov 0.5 over var 1 → Pearson 0.5; max |diff| 1
    got = bg.cosine_agreement(_sym([0.0, 1.0, 2.0]), _sym([0.0, 2.0, 1.0]))
    assert got["pearson"] == pytest.approx(0.5) and got["max_abs_diff"] == pytest.approx(1.0)
    two = bg.cosine_agreement(np.array([[1, 0.5], [0.5, 1]]), np.array([[1, 0.25], [0.25, 1]]))
    assert math.isnan(two["pearson"]) and two["max_abs_diff"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="equal"):
        bg.cosine_agreement(_sym([0, 0, 0]), np.eye(2))


def test_a_venv_whose_torch_moved_is_refused():
    assert bg.torch_refusal("2.13.0+cpu") is None and bg.torch_refusal("2.13.0") is None
    for moved in ("2.12.1+cpu", "2.13.1", "2.14.0+cu130"):
        assert "refused" in bg.torch_refusal(moved)
    assert bg.torch_refusal("2.11.0+cu130", "torch==2.11.0") is None


def _cmp(ours_s, berg_s, ours_mib, berg_mib) -> dict:
    return {
        "workload": "3 sources x 2 examples, 1,000 tokens",
        "tokens": 1000,
        "n_sources": 3,
        "ours": {"seconds": ours_s, "peak_bytes": [m * 2**20 for m in ours_mib]},
        "bergson": {"seconds": berg_s, "peak_bytes": [m * 2**20 for m in berg_mib]},
        "memory_kind": "peak RSS growth",
        "bergson_setup": "21 modules x 112²",
        "agreement": {"ours_vs_bergson": {"pearson": 0.99, "max_abs_diff": 0.01}},
    }


def test_the_table_puts_each_side_beside_the_ahead_of_bergson_targets(capsys):
    res = Results("bergson")
    # ours 1000/[1, 2, 4] s → median 500 tok/s; bergson 1000/[2, 2, 3] → 500: ratio 1.0 (met);
    # memory medians 200 vs 400 MiB → 0.5 (met)
    bg.add_comparison_figures(res, "demo", _cmp([1, 2, 4], [2, 2, 3], [100, 200, 300], [400] * 3))
    fig = {f.name: f for f in res.figures}
    assert fig["gradient stage (ours)"].value == pytest.approx(500)
    assert fig["bergson gradient-store build"].value == pytest.approx(500)
    speed = fig["ours ÷ bergson, tokens/s (ahead of bergson)"]
    assert speed.value == pytest.approx(1.0) and speed.ok is True
    assert fig["peak memory, ours"].value == pytest.approx(200)
    mem = fig["ours ÷ bergson, peak memory (ahead of bergson)"]
    assert mem.value == pytest.approx(0.5) and mem.ok is True
    agree = fig["source cosines, ours vs bergson (same parameters): max |diff|"]
    assert agree.value == pytest.approx(0.01) and "Pearson 0.99000" in agree.note
    assert "250-1,000 tok/s over 3 rounds" in fig["gradient stage (ours)"].note
    # slower and heavier than bergson: both targets missed, and the table says so
    res = Results("bergson")
    cmp = _cmp([4, 4, 4], [1, 1, 1], [300] * 3, [100] * 3) | {"exact_skipped": "too large"}
    bg.add_comparison_figures(res, "smol", cmp)
    fig = {f.name: f for f in res.figures}
    assert fig["ours ÷ bergson, tokens/s (ahead of bergson)"].value == pytest.approx(0.25)
    assert fig["ours ÷ bergson, tokens/s (ahead of bergson)"].ok is False
    assert fig["ours ÷ bergson, peak memory (ahead of bergson)"].ok is False
    assert fig["source cosines against the exact ones"].skipped
    print_table([res])
    assert capsys.readouterr().out.count("MISSED") == 2
    res = Results("bergson")  # --tiny / --quick: no targets
    bg.add_comparison_figures(res, "t", _cmp([1] * 3, [1] * 3, [1] * 3, [1] * 3), targets=False)
    assert all(f.target is None for f in res.figures)


def test_without_the_venv_the_benchmark_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setattr(bg, "BG_VENV", tmp_path / "absent")
    exe, how = bg.ensure_bergson(install=False)
    assert exe is None and "python -m benchmarks.bench_bergson" in how
    res = bg.run(quick=True)
    (fig,) = res.figures
    assert fig.skipped and "builds it" in fig.note


def _venv_or_skip():
    if bg.bergson_python() is None:
        pytest.skip(f"no .bench/bergson-venv: {bg.HOW_TO_BUILD}")


@pytest.mark.slow
def test_quick_run_beside_bergson():
    """Both sides on 3 demo sources x 8 examples: every row measured, both banks agree."""
    _venv_or_skip()
    res = bg.run(quick=True)
    fig = {f.name: f for f in res.figures}
    assert not any(f.skipped for f in res.figures if "exact" not in f.name)
    assert fig["gradient stage (ours)"].value > 0 and fig["bergson gradient-store build"].value > 0
    assert fig["peak memory, ours"].value > 0 and fig["peak memory, bergson"].value > 0
    raw = res.raw["demo base"]
    assert raw["bergson_width"] == 21 * 112**2 and raw["bergson_torch"].startswith("2.13.0")
    same = raw["agreement"]["ours_vs_bergson"]
    # two estimates of the same exact cosines at ~2^18: close to each other and to the exact
    assert same["max_abs_diff"] < 0.05
    for key in ("ours_vs_exact", "bergson_vs_exact", "ours_same_parameters_vs_exact"):
        assert raw["agreement"][key]["max_abs_diff"] < 0.05, key


@pytest.mark.slow
def test_bench_gpu_bergson_rows_on_the_cpu_at_tiny_size(tmp_path):
    """bench_gpu's bergson path on the CPU at the tiny Qwen2 shape (not measured on a card)."""
    _venv_or_skip()
    import torch

    from benchmarks import bench_gpu

    spec = bench_gpu.SIZES["tiny"] | {"sources": 3, "tiny": True}
    tok = bench_gpu.build_tokenizer(spec["model"]["vocab_size"])
    mix = bench_gpu.build_mixture(spec, 3)
    model = bench_gpu.build_model(spec["model"], torch.bfloat16, torch.device("cpu"))
    cmp = bench_gpu.measure_bergson(model, tok, mix, spec, torch.device("cpu"), 1, tmp_path)
    assert isinstance(cmp, dict), cmp
    assert cmp["tokens"] > 0 and cmp["ours"]["seconds"][0] > 0
    assert cmp["bergson"]["seconds"][0] > 0 and cmp["memory_kind"] == "peak RSS growth"
    assert cmp["agreement"]["ours_vs_bergson"]["max_abs_diff"] < 0.2  # bf16, tiny width ratio
    assert not (tmp_path / "bergson").exists()
    res = Results("gpu")
    bench_gpu.add_comparison_figures(res, "tiny bergson", cmp, targets=False)
    assert all(f.target is None for f in res.figures)
