"""The figure rules, checked mechanically on every figure of a small run (screen and paper style).

Rules: a distinct look per legend entry; the legend outside the plotting area; text within the
canvas (estimated, see `text_width`); the value axis of bars includes 0. Then the contact sheet.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from PIL import Image

from merit_lab.analysis.conflict import compute_conflict_space
from merit_lab.analysis.examples import pair_contributions
from merit_lab.io import atomic_write_json
from merit_lab.partition.methods import split_balanced
from merit_lab.pipeline.figures import CONTACT_SHEET, WIDE_STEMS, collect_figures, write_figures
from merit_lab.viz.export import make_contact_sheet, save_figure, static_renderer_problem
from merit_lab.viz.plots import plot_comparison
from merit_lab.viz.plots_diagnostics import plot_diagnostics_files
from merit_lab.viz.style import MARKERS, PALETTE, paper_layout, style_map
from tests.test_fold_display import hand_made_stability
from tests.test_plots_frontier import pilot_frontier

# 16 sources and 14 models: more series than the 12 colours, so the dash/marker/hatch cycle is
# what keeps them apart.
NAMES = [f"{fam}-{i}" for fam in ("add", "sub", "max", "min") for i in range(4)]
MODELS = ["theta0", "joint-1ep", "joint-2ep"] + [f"merit-{k}d+method-{k}" for k in range(11)]

# Text extents are estimated, not measured: a character is CHAR_EM font sizes wide (Arial's
# widest common glyphs ~0.6 em, lowercase text ~0.5 em: 0.6 over-estimates) and a line is
# LINE_EM font sizes high. A legend entry adds its symbol, ~40 px (plotly's itemwidth 30 + gap).
CHAR_EM, LINE_EM, LEGEND_SYMBOL_PX = 0.6, 1.3, 40
DEFAULT_SIZE = (700, 450)  # plotly's figure size when width/height are unset
DEFAULT_FONT = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished-looking run: conflict, partition, eval of 14 models, training logs of 14
    runs, convergence of 16 sources and every diagnostics document."""
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=40), rng.normal(size=40)
    rows = np.stack(
        [
            (i % 2 * 2 - 1) * a + (i // 8 * 2 - 1) * b + rng.normal(size=40)
            for i in range(len(NAMES))
        ]
    )
    space = compute_conflict_space(rows, NAMES)
    space.save(root / "conflict.json")
    examples = {n: 10 + i for i, n in enumerate(NAMES)}
    tokens = {n: 100 * (i + 1) for i, n in enumerate(NAMES)}
    sources = [
        {
            "name": n,
            "n_train": examples[n],
            "train_tokens": tokens[n],
            "train_response_tokens": tokens[n] // 2,
            "metadata": {"family": n.split("-")[0]},
        }
        for n in NAMES
    ]
    atomic_write_json(root / "mixture.json", {"sources": sources, "info": {}})
    split_balanced(space, examples, tokens, r=2).save(root / "partition.json")
    flips = {NAMES[0]: 1.0, NAMES[5]: 2 / 3, NAMES[9]: 1 / 3}  # the fold figures' stability
    hand_made_stability(NAMES, space.cosine, flips=flips).save(root / "fold_stability.json")
    recs = [
        {
            "model": m,
            "source": n,
            "family": n.split("-")[0],
            "split": "eval",
            "metric": metric,
            "value": v,
            "n": 4,
        }
        for j, m in enumerate(MODELS)
        for n in NAMES
        for metric, v in (("loss", 0.3 + 0.01 * j), ("exact_match", 0.2 + 0.02 * j))
    ]
    recs += [
        {
            "model": m,
            "source": task,
            "family": "lm-eval",
            "split": "lm-eval",
            "metric": metric,
            "value": v,
            "n": 12,
        }
        for j, m in enumerate(MODELS)
        for task in ("local_gen", "local_mc")
        for metric, v in (("acc", 0.3 + 0.02 * j), ("acc_stderr", 0.1))
    ]
    pd.DataFrame(recs).to_parquet(root / "eval.parquet")
    for j in range(14):
        log = root / "branches" / f"experiment-{j}" / "0" / "log.jsonl"
        log.parent.mkdir(parents=True)
        log.write_text(
            "".join(
                json.dumps({"loss": 3 - s / 10 - j / 50, "tokens": 50 * s}) + "\n"
                for s in range(1, 30)
            )
        )
    conv = pd.DataFrame(
        [
            {"source": n, "n": k, "boot": bt, "cosine": 1 - 1 / (k + bt + 1)}
            for n in NAMES
            for k in (2, 4, 8)
            for bt in (0, 1)
        ]
    )
    conv.to_parquet(root / "convergence.parquet")
    return root


def diagnostics_documents() -> dict[str, dict]:
    """Loaded ``diagnostics/*.json`` documents with 14 paths, 14 models, 2 spectral rows."""
    alphas = np.linspace(0, 1, 5)
    paths = [
        {
            "split": "train",
            "experiment": "merit-2d",
            "a": f"merit-2d/{i}",
            "b": "merged",
            "alphas": alphas.tolist(),
            "losses": (1 + 0.1 * i + alphas * (1 - alphas)).tolist(),
            "loss_a": 1 + 0.1 * i,
            "loss_b": 1 + 0.1 * i,
            "barrier": 0.25,
        }
        for i in range(14)
    ]
    models = {
        m: {
            "kind": "merged",
            "total": 1.0 + j,
            "per_layer": {f"model.layers.{k}": 0.1 * (j + k) for k in range(3)},
        }
        for j, m in enumerate(MODELS)
    }
    draws = [
        {"model": m, "sigma": s, "seed": seed, "loss": 1 + s, "delta": s * (1 + j)}
        for j, m in enumerate(MODELS)
        for s in (0.0, 0.01)
        for seed in (0, 1)
    ]
    spectral = {
        "direction": [0, 1, 2],
        "eigval": [3.0, 2.0, 1.0],
        "branch_energy": [1e-3, 1e-4, 1e-5],
        "merged_energy": [1e-4, 1e-6, 1e-5],
    }
    gain = [{"row": r, "spectral_filtering": spectral} for r in ("merit-2d+ties", "random-k4")]
    return {
        "paths": {"paths": paths},
        "displacement": {"models": models},
        "perturbation": {"draws": draws},
        "gain": {"experiments": gain},
    }


def interpretability_figures() -> dict[str, go.Figure]:
    """The figures of the report's stability, layer-wise and drift sections and of the example
    explorer, built from synthetic inputs of the shapes those stages produce."""
    from merit_lab.analysis.conflict import compute_conflict_space
    from merit_lab.analysis.drift import compute_drift
    from merit_lab.analysis.layerwise import LayerBank, ParamGroup, compute_layer_conflict
    from merit_lab.partition.stability import bootstrap_split_stability
    from merit_lab.viz.plots_drift import plot_drift_angles, plot_drift_map
    from merit_lab.viz.plots_examples import plot_example_cloud, plot_pair_contributions
    from merit_lab.viz.plots_layers import plot_layer_axis_shares, plot_layer_cosines
    from merit_lab.viz.plots_stability import (
        plot_ari_distribution,
        plot_coassignment,
        plot_cosine_spread,
    )
    from tests.test_examples import _synthetic
    from tests.test_stability import COUNTS, NAMES, TOKENS, _mixture

    rows, tokens, sources = _mixture(1.0)
    st = bootstrap_split_stability(
        rows,
        tokens,
        sources,
        NAMES,
        examples=COUNTS,
        train_tokens=TOKENS,
        rs=(1, 2),
        n_boot=20,
        seed=0,
    )
    _rows, _tok, bank, names, sk = _synthetic(t=6)
    space = compute_conflict_space(bank, names)
    table = sk.table(space, r=3)
    rng = np.random.default_rng(0)
    groups, start = [], 0
    for layer in range(3):
        for kind in ("attention", "mlp"):
            groups.append(
                ParamGroup(
                    f"layer.{layer}.{kind}", kind, layer, (f"p{layer}{kind}",), start, start + 16
                )
            )
            start += 16
    layer_bank = LayerBank(tuple(names), tuple(groups), rng.normal(size=(6, start)).astype("f4"))
    lc = compute_layer_conflict(layer_bank, k=2, contrasts={"style": ["a", "b"] * 3})
    later = {f"{e}/end": bank + 0.5 * rng.normal(size=bank.shape) for e in ("joint-1ep", "m/0")}
    drift = compute_drift(names, bank, later, k=2)
    return {
        "stability_coassign_r1": plot_coassignment(st, 1),
        "stability_ari": plot_ari_distribution(st),
        "stability_spread": plot_cosine_spread(st),
        "example_cloud": plot_example_cloud(space, table, names[0]),
        "example_pair": plot_pair_contributions(
            pair_contributions(sk, names[0], names[1]), names[0], names[1]
        ),
        "layer_axis_shares": plot_layer_axis_shares(lc),
        "layer_cosines": plot_layer_cosines(lc),
        "drift_angles": plot_drift_angles(drift),
        "drift_map": plot_drift_map(drift),
    }


@pytest.fixture(scope="module")
def figures(run_dir) -> dict[str, go.Figure]:
    """Every figure of the run, each in the screen style and in the paper style."""
    raw = collect_figures(run_dir) | plot_diagnostics_files(diagnostics_documents())
    raw |= interpretability_figures()
    raw["frontier"] = pilot_frontier()
    spread = pd.DataFrame(0.01, index=MODELS[:3], columns=["add", "sub"])
    wide = pd.DataFrame(0.5, index=MODELS, columns=["add", "sub", "avg"])
    raw["compare_spread"] = plot_comparison(wide, metric="loss", spread=spread)
    figs = {f"screen/{k}": v for k, v in raw.items()}
    figs |= {f"paper/{k}": paper_layout(v, wide=k.startswith(WIDE_STEMS)) for k, v in raw.items()}
    return figs


def test_the_run_has_every_kind_of_figure(figures):
    stems = {k.split("/", 1)[1] for k in figures}
    want = {
        "conflict_clustermap",
        "conflict_heatmap",
        "conflict_scatter",
        "conflict_scatter_3d",
        "explained_variance",
        "compare_loss",
        "compare_exact_match",
        "training",
        "gradient_convergence",
        "diag_paths_merit-2d",
        "diag_displacement",
        "diag_perturbation",
        "diag_spectral_merit-2d_ties",
        "compare_lm_eval",
        "stability_coassign_r1",
        "stability_ari",
        "stability_spread",
        "example_cloud",
        "example_pair",
        "layer_axis_shares",
        "layer_cosines",
        "drift_angles",
        "drift_map",
        "frontier",
        "fold_cosine",
        "fold_agreement",
        "fold_flips",
    }
    assert want <= stems, want - stems


# ---- rule 1: a distinct look per legend entry -------------------------------------------------


def legend_entries(fig: go.Figure) -> list[go.BaseTraceType]:
    """The traces that have a legend entry (plotly hides it for a lone trace by default)."""
    shown = [t for t in fig.data if t.showlegend is not False and t.name]
    if fig.layout.showlegend is False or (fig.layout.showlegend is None and len(fig.data) < 2):
        return []
    return shown


def look(trace: go.BaseTraceType) -> tuple:
    """What tells an entry apart: (kind, colour, dash, marker symbol, hatch, fill)."""
    mode = getattr(trace, "mode", None) or ""
    line = getattr(trace, "line", None)
    marker = getattr(trace, "marker", None)
    color = (line.color if line is not None and "lines" in mode else None) or (
        marker.color if marker is not None else None
    )
    dash = (line.dash or "solid") if "lines" in mode else None
    symbol = (marker.symbol or "circle") if "markers" in mode else None
    pattern = None
    if trace.type == "bar":
        pattern = marker.pattern.shape or ""
    return (trace.type, str(color), dash, symbol, pattern, getattr(trace, "fill", None))


def test_every_legend_entry_has_its_own_look(figures):
    for stem, fig in figures.items():
        entries = legend_entries(fig)
        looks = [look(t) for t in entries]
        dup = {lk for lk in looks if looks.count(lk) > 1}
        assert not dup, f"{stem}: entries share a look {dup}: {[t.name for t in entries]}"
        names = [t.name for t in entries]
        assert len(set(names)) == len(names), f"{stem}: repeated legend names {names}"


def test_the_look_cycle_keeps_60_series_apart():
    looks = style_map(f"s{i:02d}" for i in range(60))  # sorted as strings, like color_map
    looks = {int(k[1:]): v for k, v in looks.items()}
    assert len({(s.color, s.dash, s.symbol) for s in looks.values()}) == 60
    assert len({(s.color, s.pattern) for s in looks.values()}) == 60
    assert [looks[i].color for i in range(12)] == list(PALETTE)
    assert len({looks[i].symbol for i in range(9)}) == 9 and set(MARKERS) >= {
        s.symbol for s in looks.values()
    }


# ---- rule 2: the legend outside the plotting area ---------------------------------------------


def plot_domain(fig: go.Figure) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) in paper coordinates: the union of every axis' (or scene's) domain."""
    xs, ys = [], []
    lay = fig.layout
    for name in lay:
        obj = lay[name]
        if name.startswith("xaxis") and obj.domain:
            xs += list(obj.domain)
        elif name.startswith("yaxis") and obj.domain:
            ys += list(obj.domain)
        elif name.startswith("scene") and obj.domain and obj.domain.x:
            xs += list(obj.domain.x)
            ys += list(obj.domain.y)
    return (min(xs, default=0.0), max(xs, default=1.0), min(ys, default=0.0), max(ys, default=1.0))


def test_the_legend_is_outside_the_plot(figures):
    for stem, fig in figures.items():
        if not legend_entries(fig):
            continue
        leg = fig.layout.legend
        # plotly's defaults: a vertical legend at x = 1.02 anchored left, y = 1 anchored top
        x = 1.02 if leg.x is None else leg.x
        y = 1.0 if leg.y is None else leg.y
        xanchor, yanchor = leg.xanchor or "left", leg.yanchor or "top"
        x0, x1, y0, y1 = plot_domain(fig)
        outside = (
            (xanchor == "left" and x >= x1)
            or (xanchor == "right" and x <= x0)
            or (yanchor == "bottom" and y >= y1)
            or (yanchor == "top" and y <= y0)
        )
        assert outside, (
            f"{stem}: legend at ({x}, {y}) anchored {xanchor}/{yanchor} is over the plot"
        )
        assert fig.layout.margin.autoexpand is not False, f"{stem}: margins cannot grow to fit it"


# ---- rule 3: text within the canvas -----------------------------------------------------------


def text_width(text: str, size: float) -> float:
    """Estimated width in px of one line of plain text (HTML tags dropped) at font ``size``."""
    plain = text
    while "<" in plain and ">" in plain[plain.index("<") :]:
        i = plain.index("<")
        plain = plain[:i] + plain[plain.index(">", i) + 1 :]
    return CHAR_EM * size * len(plain)


def canvas(fig: go.Figure) -> tuple[float, float, float]:
    lay = fig.layout
    font = (lay.font.size if lay.font and lay.font.size else None) or DEFAULT_FONT
    return (lay.width or DEFAULT_SIZE[0], lay.height or DEFAULT_SIZE[1], font)


def test_text_fits_in_the_canvas(figures):
    """Titles, legends, axis titles and tick labels, by the estimates of `text_width`.

    - the title (centred) is narrower than the canvas;
    - a legend on the right takes at most 40% of the width (plotly grows the right margin by
      it); a legend above or below fits its widest entry in the width, and its rows (entries per
      row from that width) take at most 45% of the height;
    - an axis title is shorter than the canvas side it runs along;
    - category tick labels take at most 40% of the canvas side they push against, and the axis
      has ``automargin`` so the margin grows to fit them (plotly's default margin of 80 px
      clips longer labels).
    """
    for stem, fig in figures.items():
        width, height, font = canvas(fig)
        lay = fig.layout
        if lay.title.text:
            size = (lay.title.font.size if lay.title.font else None) or font * 1.3
            assert text_width(lay.title.text, size) <= width, f"{stem}: title too long"
        entries = legend_entries(fig)
        if entries:
            size = (lay.legend.font.size if lay.legend.font else None) or font
            slots = [LEGEND_SYMBOL_PX + text_width(t.name, size) for t in entries]
            if lay.legend.orientation == "h":
                assert max(slots) <= width - 20, f"{stem}: a legend entry is wider than the figure"
                per_row = max(1, int((width - 20) // max(slots)))
                rows = math.ceil(len(slots) / per_row)
                assert rows * LINE_EM * 2 * size <= 0.45 * height, f"{stem}: legend too tall"
            else:
                assert max(slots) <= 0.4 * width, f"{stem}: legend leaves the plot too little room"
        for name in lay:
            if not name.startswith(("xaxis", "yaxis")):
                continue
            axis, side = lay[name], (width if name.startswith("x") else height)
            if axis.title and axis.title.text:
                size = (axis.title.font.size if axis.title.font else None) or font
                assert text_width(axis.title.text, size) <= side, f"{stem}: {name} title"
            labels = _tick_labels(fig, name, axis)
            if labels and axis.showticklabels is not False:
                size = (axis.tickfont.size if axis.tickfont else None) or font
                angle = math.radians(abs(axis.tickangle or 0))
                longest = max(text_width(str(v), size) for v in labels)
                # x labels push the bottom margin by their height, y labels the left by width
                push = longest * (math.sin(angle) if name.startswith("x") else math.cos(angle))
                other = height if name.startswith("x") else width
                assert push <= 0.4 * other, f"{stem}: {name} tick labels ~{push:.0f} px"
                assert axis.automargin, f"{stem}: {name} cannot grow its margin for its labels"


def _tick_labels(fig: go.Figure, name: str, axis) -> list:
    """The category labels an axis shows: its ticktext, or the x/y values of its traces."""
    if axis.ticktext:
        return list(axis.ticktext)
    key, ref = name[0], name.replace("axis", "")
    vals = []
    for t in fig.data:
        if t.type in ("scatter3d",) or (getattr(t, f"{key}axis", None) or key) != ref:
            continue
        v = getattr(t, key, None)
        if v is not None and len(v) and isinstance(next(iter(v)), str):
            vals += list(v)
    return vals


# ---- rule 4: bars start at zero ---------------------------------------------------------------


def test_bars_start_at_zero(figures):
    """On the figure object: a linear value axis whose explicit range holds 0, or autorange with
    ``rangemode="tozero"`` (no renderer needed)."""
    for stem, fig in figures.items():
        for t in (t for t in fig.data if t.type == "bar"):
            key = "xaxis" if t.orientation == "h" else "yaxis"
            ref = (t.xaxis if key == "xaxis" else t.yaxis) or key[0]
            axis = fig.layout[key + ref[1:]]
            assert axis.type != "log", f"{stem}: bars on a log axis have no zero"
            if axis.range is not None and axis.autorange is not True:
                lo, hi = axis.range
                assert lo <= 0 <= hi, f"{stem}: the bar axis spans [{lo}, {hi}], not 0"
            else:
                assert axis.rangemode == "tozero", f"{stem}: the bar axis may not reach 0"


def test_comparison_draws_the_seed_spread_as_error_bars():
    wide = pd.DataFrame([[0.2, 0.4], [0.3, 0.5]], index=["a", "b"], columns=["f", "avg"])
    spread = pd.DataFrame([[0.01, np.nan]], index=["b"], columns=["f", "avg"])
    fig = plot_comparison(wide, metric="exact_match", spread=spread)
    assert fig.data[0].error_y.array is not None
    np.testing.assert_allclose(fig.data[0].error_y.array, [0.0, 0.0])  # a: no spread given
    np.testing.assert_allclose(fig.data[1].error_y.array, [0.01, 0.0])  # b: NaN draws none
    assert plot_comparison(wide, metric="loss").data[0].error_y.array is None
    with pytest.raises(ValueError, match="lacks"):
        plot_comparison(wide, metric="loss", spread=spread.rename(index={"b": "c"}))
    with pytest.raises(ValueError, match=">= 0"):
        plot_comparison(wide, metric="loss", spread=-spread.fillna(0))


# ---- the contact sheet ------------------------------------------------------------------------


def test_contact_sheet_tiles_every_png(tmp_path):
    colors = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    pngs = {}
    for i, (name, rgb) in enumerate(colors.items()):
        pngs[name] = tmp_path / f"{name}.png"
        Image.new("RGB", (200, 100 + 50 * i), rgb).save(pngs[name])
    out = make_contact_sheet(pngs, tmp_path / "sheet.png", columns=2, cell_width=100)
    with Image.open(out) as im:
        sheet = im.convert("RGB")
    # 2 columns of 100 px with 16 px padding; the tallest tile of row 1 is 75 px high
    assert sheet.width == 2 * 116 + 16
    assert sheet.getpixel((16 + 50, 16 + 25)) == (255, 0, 0)
    assert sheet.getpixel((132 + 50, 16 + 30)) == (0, 255, 0)
    caption_h = max(12, 100 // 28) + 12
    row2 = 16 + 75 + caption_h + 16
    assert sheet.getpixel((16 + 50, row2 + 40)) == (0, 0, 255)
    assert sheet.height == row2 + 100 + caption_h + 16
    with pytest.raises(ValueError, match="no PNGs"):
        make_contact_sheet({}, tmp_path / "empty.png")


@pytest.mark.slow  # ~30 s of Chromium on 2 busy cores; test_figures renders PNGs by default
@pytest.mark.skipif(static_renderer_problem() is not None, reason="no static renderer")
def test_figures_command_writes_a_contact_sheet(run_dir, tmp_path):
    written = write_figures(run_dir, tmp_path, formats=("png",))
    assert tmp_path / CONTACT_SHEET in written
    stems = list(collect_figures(run_dir))
    with Image.open(tmp_path / CONTACT_SHEET) as im:
        rows = math.ceil(len(stems) / 4)
        assert im.width == 4 * 616 + 16 and im.height > rows * 300
        # each tile is the figure's PNG scaled to 600 px: the first tile's top-left matches
        with Image.open(tmp_path / f"{stems[0]}.png") as first:
            tile = first.convert("RGB").resize((600, round(first.height * 600 / first.width)))
        crop = im.convert("RGB").crop((16, 16, 616, 16 + tile.height))
        diff = np.abs(np.asarray(crop, dtype=int) - np.asarray(tile, dtype=int)).mean()
        assert diff < 3, diff
    # PDF is one of the formats, in the same style
    pdf = save_figure(
        paper_layout(collect_figures(run_dir)["compare_loss"]), tmp_path / "c", formats=("pdf",)
    )
    assert pdf[-1].suffix == ".pdf" and pdf[-1].read_bytes()[:5] == b"%PDF-"
