"""The collapse demo's numbers in docs/guide/collapse.md and the README are the results file of one
run of `configs/demo-collapse.yaml` (docs/collapse_results.json, its `results.json`): every cell
of the guide's table and every number of the sentences checked here is recomputed from that file,
the seed means and spreads with the library's own functions (`seed_spread` for the distances,
`noise_calls` for a difference and its pooled spread)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from merit_lab.evaluation.evaluate import seed_spread
from merit_lab.pipeline.report_seeds import noise_calls

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide" / "collapse.md"
CURATION = ROOT / "docs" / "guide" / "curation.md"
RESULTS = ROOT / "docs" / "collapse_results.json"
HEADER = "| row | conversations in style (%) | short-task loss | short exact match (%) | ‖θ − θ0‖ |"
# the guide's row label -> the model in results.json (controls: the merge's own row + suffix)
ROWS = {
    "θ0": "theta0",
    "joint, 0.5 epoch": "joint-0.5ep",
    "joint, 1 epoch": "joint-1ep",
    "joint, 2 epochs": "joint-2ep",
    "uniform soup (3 seeds)": "soup",
    **{f"random K={k}, p{p}": f"random-k{k}-p{p}" for k in (2, 4, 8) for p in range(3)},
    "MERIT-1D (K=2)": "merit-1d",
    "MERIT-2D (K=4)": "merit-2d",
    "MERIT-3D (K=8)": "merit-3d",
    "gain-searched K=4": "gain-k4",
}


@pytest.fixture(scope="module")
def results() -> dict:
    return json.loads(RESULTS.read_text(encoding="utf-8"))


def _pm(mean: float, std: float | None, seeds: int, fmt: str) -> str:
    """A cell as the guide prints it: ``mean ± sd`` over seeds, the mean alone for one seed."""
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if seeds > 1 else "")


def _pct(value: float) -> str:
    """A share as the prose prints it: one decimal, a whole number without it (100 %, 0 %)."""
    return f"{value:.1f}".removesuffix(".0")


def _distances(results: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(mean, std) over training seeds of each merge's ‖θ − θ0‖, its controls' distances and α,
    the early control's step, and its joint row's distance d_merge / α, from ``controls``."""
    per_seed = {}
    for label, entry in results["controls"].items():
        shrink, early = entry["shrink"], entry["early"]
        per_seed[label] = {
            "merge": entry["distance_to_base"],
            "shrink": shrink["distance_to_base"],
            "alpha": shrink["alpha"],
            "early": early["distance_to_base"],
            "step": early["step"],
            "joint": entry["distance_to_base"] / shrink["alpha"],
        }
    wide = pd.DataFrame(per_seed).T
    mean, std, seeds = seed_spread(wide, {m: m.split("@")[0] for m in wide.index})
    assert set(seeds) == {3}
    # every merge of one seed pulls back the same joint run: its distance agrees across merges
    joint = wide["joint"].groupby([m.partition("@")[2] for m in wide.index]).agg(["min", "max"])
    assert ((joint["max"] - joint["min"]) / joint["max"] < 1e-6).all()
    return mean, std


def expected_rows(results: dict) -> dict[str, tuple[str, list[str]]]:
    """The guide's table, row label -> (model, cells), from the results file: the held-out
    conversations in style (the frontier's y: seed mean and spread), the short-task loss and
    exact match (``seeds``), and the distances (means over seeds)."""
    points, seeds = results["frontier"]["points"], results["seeds"]
    dist, _ = _distances(results)
    labels = {}  # each merge followed by its controls
    for label, model in ROWS.items():
        labels[label] = model
        if model in dist.index:
            head = label.split(" ")[0]
            labels[f"{head} ↳ shrink (α {dist.at[model, 'alpha']:.3f})"] = f"{model}:shrink"
            labels[f"{head} ↳ early (step {dist.at[model, 'step']:.0f})"] = f"{model}:early"
    out = {}
    for label, model in labels.items():
        loss, em = seeds["loss"][model], seeds["exact_match"][model]
        n = loss["seeds"]
        style = points[model]
        cells = [
            _pm(style["y"], style["y_err"], n, "{:.1f}"),
            _pm(loss["mean"], loss["std"], n, "{:.2f}"),
            _pm(em["mean"], em["std"], n, "{:.1f}"),
        ]
        base, _, control = model.partition(":")
        if model == "theta0":
            d = "0"
        elif model == "joint-1ep":
            d = f"{dist['joint'].iloc[0]:.2f}"
        elif base in dist.index:
            d = f"{dist.at[base, control or 'merge']:.2f}"
        else:
            d = ""
        out[label] = (model, [*cells, d])
    return out


def _guide_rows() -> list[tuple[str, list[str]]]:
    """The guide's table as (label, cells), a control's label prefixed with its merge's."""
    text = GUIDE.read_text(encoding="utf-8")
    lines = text[text.index(HEADER) :].split("\n\n")[0].splitlines()[2:]
    out, merge = [], ""
    for line in lines:
        label, *cells = (c.strip() for c in line.strip().strip("|").split("|"))
        if label.startswith("↳"):
            label = f"{merge} {label}"
        else:
            merge = label.split(" ")[0]
        out.append((label, cells))
    return out


def test_collapse_table_is_the_committed_results_file(results):
    """Every row and cell of the guide's table, in the run's row order, from the results file."""
    want = expected_rows(results)
    got = _guide_rows()
    assert [label for label, _ in got] == list(want)
    for label, cells in got:
        assert cells == want[label][1], label
    models = sorted(m for m, _ in want.values())
    assert models == sorted(results["models"])  # every model of the run, once


def _diff(results: dict, metric: str, row: str, reference: str) -> tuple[float, float]:
    """(``row − reference``, the pooled seed spread) of the seed means, by the report's
    `noise_calls`; ``style`` is the held-out in-style share (the frontier's y)."""
    if metric == "style":
        points = results["frontier"]["points"]
        mean = pd.Series({m: points[m]["y"] for m in (row, reference)})
        std = pd.Series({m: points[m]["y_err"] for m in (row, reference)})
    else:
        rec = results["seeds"][metric]
        mean = pd.Series({m: rec[m]["mean"] for m in (row, reference)})
        std = pd.Series({m: rec[m]["std"] for m in (row, reference)})
    ((_, diff, spread, _),) = noise_calls(mean, std, reference, higher=True)
    return diff, spread


def _delta(results: dict, metric: str, row: str, reference: str) -> str:
    """``row − reference`` ± the pooled seed spread as the docs print it."""
    diff, spread = _diff(results, metric, row, reference)
    fmt = "{:+.1f}" if metric == "style" else "{:+.2f}"
    return f"{fmt.format(diff)} ± {fmt.format(spread)[1:]}".replace("-", "−")


def _flat(path: Path) -> str:
    return " ".join(path.read_text(encoding="utf-8").split())


def test_collapse_guide_sentences_are_the_committed_results_file(results):
    """The numbers of the guide's findings, recomputed from the results file."""
    text = _flat(GUIDE)
    style = {m: p["y"] for m, p in results["frontier"]["points"].items()}
    err = {m: p["y_err"] for m, p in results["frontier"]["points"].items()}
    loss = {m: v["mean"] for m, v in results["seeds"]["loss"].items()}
    em = {m: v["mean"] for m, v in results["seeds"]["exact_match"].items()}
    held = results["heldout"]["metrics"]
    median = held["length_ratio_median"]["avg"]
    cut = held["no_eos"]["avg"]
    dist, _ = _distances(results)
    randoms = {
        k: [style[f"random-k{k}-p{p}"] for p in range(3)] for k in (2, 4, 8)
    }  # the partitions' seed means
    far = [dist.at[m, "early"] / dist.at[m, "merge"] for m in dist.index]
    expected = [
        f"{_pct(style['theta0'])} % → {style['joint-1ep']:.1f} ± {err['joint-1ep']:.1f} % after "
        f"one epoch, {_pct(style['joint-2ep'])} % after two",
        f"a median {median['joint-1ep']:.2f} and {median['joint-2ep']:.2f} of the reference's "
        "length in seed 0",
        f"MERIT-1D {style['merit-1d']:.1f} ± {err['merit-1d']:.1f} %, MERIT-2D "
        f"{style['merit-2d']:.1f} ± {err['merit-2d']:.1f} %, MERIT-3D {_pct(style['merit-3d'])} %",
        f"MERIT-3D keeps {style['merit-3d'] - style['joint-1ep']:.1f} points more",
        f"{_pct(style['merit-2d:shrink'])} % for the 2D and {_pct(style['merit-3d:shrink'])} % "
        f"for the 3D distances, {style['merit-1d:shrink']:.1f} ± {err['merit-1d:shrink']:.1f} % "
        f"at the 1D distance, where MERIT-1D keeps {style['merit-1d']:.1f} % "
        f"({_delta(results, 'style', 'merit-1d', 'merit-1d:shrink')} points",
        f"MERIT-2D's short-task loss is {loss['merit-2d']:.2f} against the shrink control's "
        f"{loss['merit-2d:shrink']:.2f} "
        f"({_delta(results, 'loss', 'merit-2d', 'merit-2d:shrink')})",
        f"MERIT-3D's {loss['merit-3d']:.2f} against {loss['merit-3d:shrink']:.2f} "
        f"({_delta(results, 'loss', 'merit-3d', 'merit-3d:shrink')})",
        f"worse than its control on both axes "
        f"({_delta(results, 'loss', 'merit-1d', 'merit-1d:shrink')})",
        f"(θ0 {em['theta0']:.1f} %, joint-2ep {em['joint-2ep']:.1f} %)",
        f"MERIT above random at K=2 ({style['merit-1d']:.1f} against "
        f"{min(randoms[2]):.1f}–{max(randoms[2]):.1f}) and K=4 ({style['merit-2d']:.1f} against "
        f"{min(randoms[4]):.1f}–{max(randoms[4]):.1f})",
        f"equal at K=8 ({_pct(style['merit-3d'])} against {min(randoms[8]):.1f}–"
        f"{_pct(max(randoms[8]))})",
        f"{min(far):.1f}–{max(far):.1f}× farther from θ0 (step "
        f"{dist.at['merit-3d', 'step']:.0f} for MERIT-3D's {dist.at['merit-3d', 'merge']:.2f} is "
        f"{dist.at['merit-3d', 'early']:.2f})",
        f"{_pct(cut['merit-1d:early'])} % and {_pct(cut['merit-2d:early'])} % of the 1D and 2D "
        "early controls' conversational answers are cut off",
        f"gain-k4 keeps {style['gain-k4']:.1f} ± {err['gain-k4']:.1f} % of the conversations "
        f"against MERIT-2D's {style['merit-2d']:.1f} ± {err['merit-2d']:.1f} %",
        f"short-task loss {loss['gain-k4']:.2f} against {loss['merit-2d']:.2f}",
        f"{results['held_out_examples_per_metric'] // 24} held-out examples per short source",
    ]
    missing = [s for s in expected if s not in text]
    assert missing == []
    # the verdicts the sentences state, by the report's own rule (beyond 2x the pooled spread)
    beyond = {
        (row, ref, metric): _beyond(results, metric, row, ref)
        for row, ref, metric in [
            ("merit-3d", "joint-1ep", "style"),
            ("merit-1d", "merit-1d:shrink", "style"),
            ("merit-2d", "merit-2d:shrink", "loss"),
            ("merit-3d", "merit-3d:shrink", "loss"),
            ("merit-1d", "merit-1d:shrink", "loss"),
            *[("merit-1d", f"random-k2-p{p}", "style") for p in range(3)],
            *[("merit-2d", f"random-k4-p{p}", "style") for p in range(3)],
            ("gain-k4", "merit-2d", "style"),
            ("gain-k4", "merit-2d", "loss"),
        ]
    }
    assert [k for k, v in beyond.items() if v] == list(beyond)[:5]
    # "the random splits' short loss is lower at each K"
    merges = {2: "merit-1d", 4: "merit-2d", 8: "merit-3d"}
    assert all(loss[f"random-k{k}-p{p}"] < loss[m] for k, m in merges.items() for p in range(3))
    positions = {m: results["frontier"]["points"][m]["position"] for m in dist.index}
    assert positions == {"merit-1d": "below", "merit-2d": "on", "merit-3d": "on"}


def _beyond(results: dict, metric: str, row: str, reference: str) -> bool:
    """Whether ``row − reference`` lies beyond twice the pooled seed spread."""
    diff, spread = _diff(results, metric, row, reference)
    return abs(diff) > 2 * spread


def test_collapse_guide_gain_sentence_is_the_curation_table():
    """The guide's gain-k4 gains (not in results.json: measured per training seed with
    `RunProbe`) are the curation guide's table, so the two pages cannot drift apart."""
    rows = {}
    for line in CURATION.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in ("MERIT-2D", "gain-searched") and len(cells) == 6 and "±" in cells[3]:
            rows.setdefault(cells[0], cells)  # the collapse demo's table comes first
    gain, merit = rows["gain-searched"], rows["MERIT-2D"]
    want = (
        f"predicted gain (H = I) {gain[1]} against {merit[1]}, measured held-out gain "
        f"{gain[2]} against {merit[2]}"
    )
    assert want in _flat(GUIDE)


def test_readme_collapse_paragraph_is_the_committed_results_file(results):
    """The README's "When does MERIT beat joint training?" paragraph, from the results file."""
    text = _flat(README)
    start = text.index("### When does MERIT beat joint training?")
    para = text[start : text.index("## ", start + 4)]
    style = {m: p["y"] for m, p in results["frontier"]["points"].items()}
    err = results["frontier"]["points"]["joint-1ep"]["y_err"]
    merges = " / ".join(_pct(style[f"merit-{r}d"]) for r in (1, 2, 3))
    shrinks = " / ".join(_pct(style[f"merit-{r}d:shrink"]) for r in (1, 2, 3))
    losses = ", ".join(
        _delta(results, "loss", f"merit-{r}d", f"merit-{r}d:shrink").split(" ±")[0] for r in (2, 3)
    )
    for want in (
        f"({style['joint-1ep']:.1f} ± {err:.1f} % in style; θ0 {_pct(style['theta0'])} %)",
        f"MERIT-1D/2D/3D keep {merges} %",
        f"the shrink controls keep as much ({shrinks} %)",
        f"(loss {losses})",
    ):
        assert want in para, want
