"""figures/ at the top of the repository: the demo's paper figures, listed in figures/README.md.

The listing and the files agree; every listed figure is a stem `merit-lab figures` gives for the
demo (`FIGURE_NAMES` / `FIGURE_PREFIXES`, held here to what `collect_figures` returns on a small
run); the files are valid images in the paper style. No demo run and no Chromium needed.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from merit_lab.config import load_config
from merit_lab.pipeline.figures import (
    FIGURE_NAMES,
    FIGURE_PREFIXES,
    PAPER,
    WIDE_STEMS,
    collect_figures,
)
from merit_lab.viz import METRICS, plot_diagnostics_files
from tests.test_figure_rules import diagnostics_documents, run_dir  # noqa: F401  (a small run)

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "figures"
HEADER = "| figure | files | caption | what it shows |"
FORMATS = {"png", "pdf", "svg"}


def listing() -> dict[str, dict]:
    """figures/README.md's table: stem → its formats, caption and description."""
    text = (FIGURES / "README.md").read_text(encoding="utf-8")
    table = text[text.index(HEADER) :].split("\n\n")[0].splitlines()[2:]
    rows = {}
    for line in table:
        stem, files, caption, shows = (c.strip() for c in line.strip().strip("|").split("|"))
        stem = stem.strip("`")
        assert stem not in rows, f"{stem} is listed twice"
        rows[stem] = {
            "formats": [f.strip() for f in files.split(",")],
            "caption": caption,
            "shows": shows,
        }
    return rows


def is_figure_stem(stem: str, cfg) -> bool:
    """A stem `collect_figures` gives for a run of ``cfg``: a fixed name, or a prefix with a
    metric (compare_, seeds_) or with one of the run's experiments (diag_paths_, diag_spectral_)."""
    if stem in FIGURE_NAMES:
        return True
    prefix = next((p for p in FIGURE_PREFIXES if stem.startswith(p)), None)
    if prefix is None:
        return False
    rest = stem.removeprefix(prefix)
    if prefix in ("compare_", "seeds_"):
        return rest in METRICS or (prefix == "compare_" and rest == "lm_eval")
    experiments = [e.name for e in cfg.experiments]
    return rest in experiments or any(rest.startswith(f"{e}_") for e in experiments)


def test_the_listing_and_the_files_agree():
    rows = listing()
    assert rows, "figures/README.md lists no figure"
    listed = {f"{stem}.{fmt}" for stem, row in rows.items() for fmt in row["formats"]}
    present = {p.name for p in FIGURES.iterdir()} - {"README.md"}
    assert present == listed, (
        f"files not listed: {sorted(present - listed)}; listed, not there: "
        f"{sorted(listed - present)} (`make figures`, then update figures/README.md)"
    )
    for stem, row in rows.items():
        assert {"png", "pdf"} <= set(row["formats"]) <= FORMATS, stem
        assert row["caption"] and row["shows"], f"{stem}: a caption and what it shows"


def test_every_listed_figure_is_one_merit_lab_figures_gives_for_the_demo():
    demo = load_config(REPO / "configs" / "demo.yaml")
    strangers = [stem for stem in listing() if not is_figure_stem(stem, demo)]
    assert not strangers, f"not a figure of `merit-lab figures runs/demo`: {strangers}"


def test_the_stem_lists_are_what_collect_figures_gives(run_dir):  # noqa: F811
    """On a small run with every artifact (and the diagnostics documents), every stem is in the
    lists and every fixed name turns up: the lists are neither loose nor stale."""
    stems = set(collect_figures(run_dir)) | set(plot_diagnostics_files(diagnostics_documents()))
    demo = load_config(REPO / "configs" / "demo.yaml")  # its merit-2d and random-k4, as here
    assert {s for s in stems if not is_figure_stem(s, demo)} == set()
    assert set(FIGURE_NAMES) <= stems
    unused = {p for p in FIGURE_PREFIXES if not any(s.startswith(p) for s in stems)}
    assert unused == {"seeds_"}  # seed means need train.seeds: tests/test_figures.py has them


def test_is_figure_stem_refuses_other_names():
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert is_figure_stem("compare_exact_match", demo) and is_figure_stem(
        "diag_paths_merit-2d", demo
    )
    for stem in ("contact_sheet", "compare_length_ratio", "diag_paths_merit-9d", "conflict"):
        assert not is_figure_stem(stem, demo), stem


@pytest.mark.parametrize("stem", sorted(listing()) if (FIGURES / "README.md").is_file() else [])
def test_files_are_valid_images_in_the_paper_style(stem):
    """The PNG is the paper width (a column, or the page for `WIDE_STEMS`) at `PAPER.scale`; the
    PDF and SVG are what their headers say."""
    formats = listing()[stem]["formats"]
    with Image.open(FIGURES / f"{stem}.png") as png:
        assert png.format == "PNG"
        width = PAPER.page_width if stem.startswith(WIDE_STEMS) else PAPER.column_width
        assert png.width == round(width * PAPER.scale)
        assert png.height <= round(PAPER.max_height * PAPER.scale) * 1.5  # plus a legend
    assert (FIGURES / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    if "svg" in formats:
        root = ET.parse(FIGURES / f"{stem}.svg").getroot()
        assert re.fullmatch(r"(\{.*\})?svg", root.tag)
