"""The README's demo table is the results file of one `make demo` run (docs/demo_results.json),
and the report stage writes that file."""

from __future__ import annotations

import json
from pathlib import Path

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
