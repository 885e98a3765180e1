"""write_figures: every figure of a run, holding the run's numbers, as HTML/JSON and PNG/SVG."""

from __future__ import annotations

import base64
import json
import logging
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.io as pio
import pytest

from merit_lab.analysis.conflict import ConflictSpace, compute_conflict_space
from merit_lab.io import atomic_write_json, read_json
from merit_lab.partition.methods import split_balanced
from merit_lab.partition.plan import Partition
from merit_lab.pipeline.figures import CONVERGENCE_FILE, PAPER, collect_figures, write_figures
from merit_lab.viz.export import static_renderer_problem
from merit_lab.viz.style import MUTED, PALETTE

NAMES = [f"{fam}-{i}" for fam in ("add", "sub") for i in range(4)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished-looking run of 8 sources: conflict, partition, eval, one log, convergence."""
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    a = rng.normal(size=30)
    rows = np.stack([(1 if n.startswith("add") else -1) * a + rng.normal(size=30) for n in NAMES])
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
    split_balanced(space, examples, tokens, r=1).save(root / "partition.json")
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
        for m, v in (("theta0", 0.2), ("merit-1d/linear", 0.5))
        for n in NAMES
        for metric, v in (("loss", 2.0 - v), ("exact_match", v))
    ]
    pd.DataFrame(recs).to_parquet(root / "eval.parquet")
    log = root / "branches" / "merit-1d" / "0" / "log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(
        "".join(json.dumps({"loss": 3 - s / 10, "tokens": 50 * s}) + "\n" for s in range(1, 6))
    )
    conv = pd.DataFrame(
        {
            "source": "add-0",
            "n": [2, 2, 4, 4],
            "boot": [0, 1, 0, 1],
            "cosine": [0.8, 0.9, 0.95, 0.97],
        }
    )
    conv.to_parquet(root / CONVERGENCE_FILE)
    return root


def _array(value) -> np.ndarray:
    """A data array as plotly's JSON holds it: a list, or typed base64 (plotly ≥ 6)."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = [int(n) for n in str(value.get("shape", len(flat))).split(",")]
        return flat.reshape(shape)
    return np.asarray(value)


def _exported(path: Path) -> dict:
    return json.loads(path.read_text())


def test_collect_figures_finds_every_artifact(run_dir):
    figs = collect_figures(run_dir)
    assert set(figs) == {
        "conflict_clustermap",
        "conflict_heatmap",
        "conflict_scatter",
        "conflict_scatter_3d",
        "explained_variance",
        "compare_loss",
        "compare_exact_match",
        "training",
        "gradient_convergence",
    }
    scatter = figs["conflict_scatter"]
    assert [t.name for t in scatter.data] == ["G0", "G1"]  # coloured by group
    assert [t.marker.color for t in scatter.data] == list(PALETTE[:2])
    bars = figs["compare_exact_match"]
    assert [t.name for t in bars.data] == ["theta0", "merit-1d/linear"]
    np.testing.assert_allclose(bars.data[1].y, [50.0, 50.0, 50.0])  # add, sub, avg in %


def test_collect_figures_on_a_run_without_later_stages(run_dir, tmp_path):
    for name in ("conflict.json", "conflict.safetensors"):
        (tmp_path / name).write_bytes((run_dir / name).read_bytes())
    figs = collect_figures(tmp_path)  # no mixture, partition, eval, logs
    assert "compare_loss" not in figs and "training" not in figs
    assert [t.name for t in figs["conflict_scatter"].data] == ["source"]
    with pytest.raises(FileNotFoundError, match="conflict"):
        collect_figures(tmp_path / "nothing")


def test_collect_figures_when_the_partition_covers_part_of_the_mixture(run_dir, tmp_path):
    """A curated run: one source dropped, one down-weighted, one in mixture.json only."""
    for name in ("conflict.json", "conflict.safetensors", "eval.parquet"):
        (tmp_path / name).write_bytes((run_dir / name).read_bytes())
    mixture = read_json(run_dir / "mixture.json")
    mixture["sources"].append(
        {
            "name": "new-0",
            "n_train": 5,
            "train_tokens": 50,
            "train_response_tokens": 25,
            "metadata": {"family": "new"},
        }
    )
    atomic_write_json(tmp_path / "mixture.json", mixture)
    part = Partition.load(run_dir / "partition.json").drop("add-1")
    part.downweight("sub-2", 0.5, examples=6, tokens=150).save(tmp_path / "partition.json")
    figs = collect_figures(tmp_path)
    scatter = figs["conflict_scatter"]
    assert [t.name for t in scatter.data] == ["G0", "G1", "dropped"]
    assert scatter.data[-1].marker.color == MUTED
    assert "add-1" in scatter.data[-1].text[0]
    assert len(figs["conflict_scatter_3d"].data) == 3
    assert "group: dropped" in str(figs["conflict_heatmap"].data[0].text)


def test_exported_figures_hold_the_run_data_in_the_paper_style(run_dir, tmp_path):
    written = write_figures(run_dir, tmp_path / "figs", formats=("html", "json"))
    names = {p.name for p in written}
    assert {"conflict_heatmap.html", "conflict_heatmap.json", "captions.md"} <= names
    assert "plotly.min.js" in names  # one shared copy, not 4 MB per HTML file
    assert 'src="plotly.min.js"' in (tmp_path / "figs" / "conflict_heatmap.html").read_text()

    space = ConflictSpace.load(run_dir / "conflict.json")
    order = list(space.order)
    shown = space.cosine[np.ix_(order, order)]
    heat = _exported(tmp_path / "figs" / "conflict_heatmap.json")["data"][0]
    np.testing.assert_array_equal(_array(heat["z"]), shown)  # C in the displayed order
    assert list(heat["x"]) == list(heat["y"]) == [space.names[i] for i in order]
    clustermap = _exported(tmp_path / "figs" / "conflict_clustermap.json")["data"][-1]
    np.testing.assert_array_equal(_array(clustermap["z"]), shown)
    scatter = _exported(tmp_path / "figs" / "conflict_scatter.json")["data"]
    points = {}
    for trace in scatter:
        names = [t.split("<br>")[0].removeprefix("<b>").removesuffix("</b>") for t in trace["text"]]
        points |= dict(
            zip(names, zip(_array(trace["x"]), _array(trace["y"]), strict=True), strict=True)
        )
    for i, n in enumerate(space.names):
        np.testing.assert_allclose(points[n], space.embedding[i, :2])

    for stem in ("conflict_scatter", "conflict_heatmap", "training"):
        layout = pio.read_json(tmp_path / "figs" / f"{stem}.json").layout
        assert layout.font.size == PAPER.font_size and layout.font.family == PAPER.font_family
        assert layout.paper_bgcolor == "white" and layout.title.text is None
        assert layout.width in (PAPER.column_width, PAPER.page_width)
    assert "Gradient conflict matrix" in (tmp_path / "figs" / "captions.md").read_text()


def test_missing_static_renderer_is_named_and_html_still_written(
    run_dir, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(
        "merit_lab.viz.export.static_renderer_problem", lambda: "kaleido is not installed: pip ..."
    )
    with caplog.at_level(logging.WARNING, logger="merit_lab.viz.export"):
        written = write_figures(run_dir, tmp_path, formats=("html", "png"))
    assert "kaleido is not installed" in caplog.text
    assert not list(tmp_path.glob("*.png"))
    assert (tmp_path / "conflict_heatmap.html") in written


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(
    static_renderer_problem() is not None,
    reason=f"no static renderer: {static_renderer_problem()}",
)
def test_png_and_svg_are_valid_images(run_dir, tmp_path):
    written = write_figures(run_dir, tmp_path, formats=("png", "svg"))
    stems = set(collect_figures(run_dir))
    for stem in stems:
        png, svg = tmp_path / f"{stem}.png", tmp_path / f"{stem}.svg"
        assert png in written and svg in written, stem
        width, height = _png_size(png.read_bytes())
        assert width in (
            round(PAPER.column_width * PAPER.scale),
            round(PAPER.page_width * PAPER.scale),
        ), stem
        assert height > 100
        root = ET.parse(svg).getroot()
        assert root.tag.endswith("svg"), stem
    # the heatmap's SVG draws the ordered source names as its tick labels
    text = (tmp_path / "conflict_heatmap.svg").read_text()
    assert all(n in text for n in NAMES)
