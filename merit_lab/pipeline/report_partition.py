"""The report's lines on the split: gain-searched splits beside their alternatives, and the
views a run computes only on demand with what they would cost.

Input: a run directory (``partition.json``, ``branches/*/partition.json``, ``timings.json``,
``mixture.json``). Output: markdown lines for the "Conflict space" section of ``report.md``.
"""

from __future__ import annotations

from merit_lab.io import read_json
from merit_lab.partition.plan import Partition
from merit_lab.partition.search import search_summary
from merit_lab.pipeline.rows import SEED_MARK
from merit_lab.pipeline.rundir import RunDir

__all__ = ["PER_EXAMPLE_FACTOR", "gain_search_lines", "on_demand_lines"]

# Per-example gradients ÷ batched ones on the same examples (docs/performance.md, gradient bank):
# a floor for `merit-lab examples`, which also sketches each example (the demo: 11 CPU-minutes
# against ≈ 2 by this factor on a quiet gradient stage)
PER_EXAMPLE_FACTOR = 6.3


def gain_search_lines(run: RunDir) -> list[str]:
    """One bullet per gain-searched split (the run's, then each experiment's): its predicted
    gain beside the PCA-median, random and k-means splits at the same K (`search_summary`)."""
    paths = [("the run's split (`partition.json`)", run.partition)]
    paths += [
        (f"experiment `{p.parent.name}`", p)
        for p in sorted(run.root.glob("branches/*/partition.json"))
        if SEED_MARK not in p.parent.name  # a training-seed repeat trains its experiment's split
    ]
    out = []
    for what, path in paths:
        if path.is_file():
            line = search_summary(Partition.load(path))
            if line:
                out.append(f"- {what}: {line}.")
    if not out:
        return []
    return [
        "Gain-searched splits (`partition.method: gain`: the balanced split with the largest "
        "predicted merging gain a seeded swap search finds from the PCA-median split):",
        "",
        *out,
        "",
    ]


def on_demand_lines(run: RunDir) -> list[str]:
    """One line: how to compute the example-level and layer-wise views this run lacks, and their
    cost estimated from this run's own gradient stage (``timings.json``).

    Example level (`merit-lab examples`): one backward per calibration example instead of
    batches, at least ``PER_EXAMPLE_FACTOR`` × the gradient stage. Layer-wise
    (``calibration.layer_groups``): the gradient stage once more, hooked per parameter group.
    """
    timings = read_json(run.timings) if run.timings.is_file() else {}
    grad_s = timings.get("gradients")
    if not isinstance(grad_s, (int, float)) or grad_s <= 0 or not run.mixture.is_file():
        return []
    cap = run.load_config().calibration.n
    n_examples = sum(min(s.get("n_calibration", 0), cap) for s in run.read_mixture()["sources"])
    parts = []
    if not run.example_sketches.is_file():
        parts.append(
            f"the example-level views and the bootstrap with `merit-lab examples {run.root}` "
            f"({n_examples} single-example backward passes: "
            f"at least {_minutes(PER_EXAMPLE_FACTOR * grad_s)}, {PER_EXAMPLE_FACTOR}× this "
            "run's gradient stage)"
        )
    if not run.layer_json.is_file():
        parts.append(
            "the layer-wise view with `calibration.layer_groups: modules` and `merit-lab run` "
            f"(the gradient stage again: ≈ {_minutes(grad_s)})"
        )
    if not parts:
        return []
    return [
        f"On demand, not computed in this run: {' and '.join(parts)}; estimates from this run's "
        f"gradient stage ({grad_s:.0f} s in `timings.json`).",
        "",
    ]


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"
