"""The README's demo table is the results file of one `make demo` run (docs/demo_results.json),
and the report stage writes that file; a fresh demo reproduces it (docs/testing.md,
"Reproducibility": bit for bit on the same machine at one thread per process, within
`DEMO_TOLERANCE` elsewhere)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
DEMO_RESULTS = README.parent / "docs" / "demo_results.json"
# README row label → model name in results.json
DEMO_ROWS = {
    "θ0": "theta0",
    "joint, 1 epoch": "joint-1ep",
    "joint, 2 epochs": "joint-2ep",
    "random split K=4, linear merge": "random-k4",
    "MERIT-1D (K=2)": "merit-1d",
    "MERIT-2D (K=4)": "merit-2d",
    "MERIT-2D, TIES": "merit-2d+ties",
    "MERIT-2D, task arithmetic (λ 0.5)": "merit-2d+task_arithmetic",
    "MERIT-3D (K=8)": "merit-3d",
    "gain-searched split K=4": "gain-k4",
}


def test_demo_table_is_the_committed_results_file():
    """Every number of the README's demo table is in docs/demo_results.json, the results.json
    of one `make demo` run (copied from runs/demo/), at the precision the table prints."""
    results = json.loads(DEMO_RESULTS.read_text(encoding="utf-8"))
    loss, em = (results["metrics"][m]["avg"] for m in ("loss", "exact_match"))
    text = README.read_text(encoding="utf-8")
    start = text.index("| model | loss | exact match |")
    table = text[start:].split("\n\n")[0].splitlines()[2:]
    seen = []
    for line in table:
        label, l_cell, em_cell = (c.strip().strip("*") for c in line.strip().strip("|").split("|"))
        model = DEMO_ROWS[label]
        seen.append(model)
        assert l_cell == f"{loss[model]:.3f}", (label, l_cell, loss[model])
        assert em_cell == f"{em[model]:.1f}", (label, em_cell, em[model])
    assert seen == results["models"]  # every model of the run, in its order
    held = results["held_out_examples_per_metric"]
    assert f"{held // 32} held-out examples per source" in text  # the demo's 32 sources


LORA_GUIDE = README.parent / "docs" / "guide" / "image-text-and-lora.md"
LORA_RESULTS = README.parent / "benchmarks" / "results_lora_bank.json"


def _printed(value: float, places: int = 3) -> str:
    """``value`` as the docs print it: the JSON's decimal rounded half up (the JSON itself holds
    4 decimals, so 1.0465 stands for a number that printed as 1.047)."""
    q = Decimal(str(value)).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    return str(q)


def _table_after(text: str, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with ``header``."""
    start = text.index(header)
    lines = text[start:].split("\n\n")[0].splitlines()[2:]
    return [[c.strip().strip("*") for c in ln.strip().strip("|").split("|")] for ln in lines]


def test_lora_bank_table_is_the_committed_benchmark_file():
    """The guide's LoRA-bank table is `benchmarks/results_lora_bank.json` (the output of
    `python -m benchmarks.bench_lora_bank`), every cell at the precision it prints, and the
    sentence after it (the swapped axes) reads the same file."""
    results = json.loads(LORA_RESULTS.read_text(encoding="utf-8"))["lora"]
    text = LORA_GUIDE.read_text(encoding="utf-8")
    rows = _table_after(text, "| warm-up steps | Pearson of the cosines |")
    assert [r[0] for r in rows] == sorted(results, key=int)  # every warm-up measured, in order
    for steps, pearson, ari1, ari2, diff in rows:
        r = results[steps]
        assert pearson == _printed(r["cosine_pearson"]), steps
        for cell, value in ((ari1, r["ari"]["r1"]), (ari2, r["ari"]["r2"])):
            printed = f"{value:.3f}".rstrip("0").replace("-", "−")
            assert cell == (printed + "0" if printed.endswith(".") else printed), (steps, cell)
        assert diff == _printed(r["max_abs_cosine_diff"]), steps
    corr = results["100"]["axis_correlation"]
    assert f"|corr| of full axis 1 with LoRA axis 2 is\n{corr[0][1]:.2f}" in text
    assert f"of full axis 2 with LoRA axis 1 {corr[1][0]:.2f}" in text
    assert f"({results['10']['n_parameters']:,} parameters" in text


# How far a fresh demo may land from docs/demo_results.json (docs/testing.md, "Reproducibility"):
# on the machine that made the file, at one thread per process, every value is equal to the
# last bit; another thread count or machine changes float sums, and a few greedy answers flip.
# Reported from another machine (issue 27): joint-1ep's exact match 20.1 against 19.9 (2 of 768
# answers, 0.26 points), joint-2ep's loss printed 0.275 against 0.2758 (0.0003 to 0.0013); the
# bounds are about twice that.
DEMO_TOLERANCE = {"exact_match": 0.55, "similarity": 0.55, "loss": 0.002}


@pytest.mark.slow
def test_a_fresh_demo_reproduces_the_committed_results(tmp_path):
    """`merit-lab run configs/demo.yaml` (what `make demo` runs, one thread per process) against
    docs/demo_results.json: the same rows, every metric within `DEMO_TOLERANCE`; the number of
    values equal to the last bit is printed (all of them on the machine that wrote the file)."""
    exe = Path(sys.executable).parent / "merit-lab"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [str(exe), "run", str(README.parent / "configs" / "demo.yaml")]
    proc = subprocess.run(
        [*cmd, "--output-dir", str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    fresh = json.loads((tmp_path / "demo" / "results.json").read_text(encoding="utf-8"))
    committed = json.loads(DEMO_RESULTS.read_text(encoding="utf-8"))
    assert fresh["held_out_examples_per_metric"] == committed["held_out_examples_per_metric"]
    equal, off = 0, []
    for metric, bound in DEMO_TOLERANCE.items():
        for model, want in committed["metrics"][metric]["avg"].items():
            got = fresh["metrics"][metric]["avg"][model]
            equal += got == want
            if abs(got - want) > bound:
                off.append((metric, model, got, want))
    print(f"fresh demo: {equal} of {3 * len(committed['models'])} values equal to the last bit")
    assert off == []
    # a row added to configs/demo.yaml needs a new docs/demo_results.json (and README table)
    assert fresh["models"] == committed["models"]


VL_RESULTS = README.parent / "docs" / "vl_results.json"
# the image-text guide's row label → model name in results.json
VL_ROWS = {
    "θ0": "theta0",
    "joint, 1 epoch": "joint-1ep",
    "random split K=4": "random-k4",
    "MERIT-1D (K=2)": "merit-1d",
    "MERIT-2D (K=4)": "merit-2d",
    "MERIT-2D, TIES": "merit-2d+ties",
}


def test_image_text_table_is_the_committed_results_file():
    """The image-text guide's table is docs/vl_results.json (the results.json of one run of
    `configs/demo-vl.yaml`): every row of the run in its order, each cell at the precision it
    prints, the best of each column (and only it) in bold."""
    results = json.loads(VL_RESULTS.read_text(encoding="utf-8"))
    loss, em = (results["metrics"][m]["avg"] for m in ("loss", "exact_match"))
    text = LORA_GUIDE.read_text(encoding="utf-8")
    start = text.index("| model | loss | exact match (%) |")
    lines = text[start:].split("\n\n")[0].splitlines()[2:]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    assert [VL_ROWS[r[0]] for r in rows] == results["models"]
    best = {"loss": min(loss, key=loss.get), "em": max(em, key=em.get)}
    for label, l_cell, em_cell in rows:
        model = VL_ROWS[label]
        for cell, want, bold in (
            (l_cell, f"{loss[model]:.3f}", best["loss"] == model),
            (em_cell, f"{em[model]:.1f}", best["em"] == model),
        ):
            assert cell == (f"**{want}**" if bold else want), (label, cell, want)
    held = results["held_out_examples_per_metric"]
    assert f"({held // 16} held-out examples per source)" in " ".join(text.split())
