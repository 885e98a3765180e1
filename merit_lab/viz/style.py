"""The look of every figure: palette, font, template, one `layout`, and the paper style.

Input: a ``go.Figure`` built anywhere in `merit_lab.viz`. Output: the same figure styled for the
screen (`layout`) or a copy sized and styled for print (`paper_layout`, `PAPER`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import plotly.graph_objects as go

__all__ = [
    "DASHES",
    "FONT",
    "MARKERS",
    "MUTED",
    "PALETTE",
    "PAPER",
    "PATTERNS",
    "TEMPLATE",
    "Figure",
    "PaperStyle",
    "SeriesStyle",
    "color_map",
    "layout",
    "paper_layout",
    "style_map",
]

# Okabe-Ito: distinguishable under the common colour-vision deficiencies, prints well in grey.
# Okabe-Ito's eight, then four of Tol's muted set: a comparison table's 9+ rows get distinct
# colours before the palette cycles.
PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#000000",
    "#882255",
    "#44AA99",
    "#999933",
    "#332288",
)
# After the palette the dash (lines) or the hatch (bars) changes, so 12 x 5 series stay distinct;
# the marker cycles on its own (9 symbols, coprime with 12), so the look reads in grey print too.
# "dot" is left out of DASHES: figures use it for reference lines (chords, bands).
DASHES = ("solid", "dash", "dashdot", "longdash", "longdashdot")
MARKERS = (
    "circle",
    "square",
    "diamond",
    "triangle-up",
    "triangle-down",
    "cross",
    "x",
    "star",
    "hexagon",
)
PATTERNS = ("", "/", "\\", "x", ".", "+")
MUTED = "#BBBBBB"  # sources that train in no row (dropped, or not placed yet)
FONT = {"family": "Helvetica, Arial, sans-serif", "size": 13}
TEMPLATE = "simple_white"
Figure = go.Figure  # the figure type, for annotations outside viz (which never imports plotly)


def color_map(values: Sequence) -> dict:
    """A stable colour per distinct value (sorted), cycling the palette."""
    return {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(sorted(set(values), key=str))}


@dataclass(frozen=True)
class SeriesStyle:
    """The look of one series: colour, line dash, marker symbol and bar hatch (plotly names)."""

    color: str
    dash: str
    symbol: str
    pattern: str

    def line(self, width: float = 1.5) -> dict:
        """``line`` of a scatter trace."""
        return {"color": self.color, "dash": self.dash, "width": width}

    def marker(self, size: int = 6, **kw) -> dict:
        """``marker`` of a scatter trace."""
        return {"color": self.color, "symbol": self.symbol, "size": size, **kw}

    def bar(self) -> dict:
        """``marker`` of a bar trace: the colour, hatched after the palette wraps."""
        return {"color": self.color, "pattern": {"shape": self.pattern, "fgcolor": "white"}}


def style_map(values: Sequence) -> dict:
    """A distinct, stable look per distinct value (sorted, as `color_map`): value i gets colour
    ``i % 12``, dash and hatch ``i // 12`` and marker ``i % 9``, so no two of 60 share a look and
    the colours agree with `color_map`'s."""
    keys = sorted(set(values), key=str)
    n = len(PALETTE)
    return {
        v: SeriesStyle(
            PALETTE[i % n],
            DASHES[(i // n) % len(DASHES)],
            MARKERS[i % len(MARKERS)],
            PATTERNS[(i // n) % len(PATTERNS)],
        )
        for i, v in enumerate(keys)
    }


# The screen legend: right of the plot, top-aligned (plotly grows the right margin to fit it).
SCREEN_LEGEND = {"x": 1.02, "xanchor": "left", "y": 1.0, "yanchor": "top"}


def layout(fig: go.Figure, title: str, **kw) -> go.Figure:
    """Apply the screen style (template, font, centred ``title``, legend right of the plot,
    axis margins that grow to fit the tick labels) and any layout ``kw``; returns ``fig``."""
    fig.update_layout(
        template=TEMPLATE, font=FONT, title={"text": title, "x": 0.5}, legend=SCREEN_LEGEND
    )
    fig.update_layout(**kw)
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)
    return fig


@dataclass(frozen=True)
class PaperStyle:
    """The one place the look of exported figures is set (sizes in CSS px, 96 per inch)."""

    font_family: str = "Arial, Helvetica, Liberation Sans, sans-serif"
    font_size: int = 10  # 7.5 pt printed at the figure's own width
    column_width: int = 336  # 3.5 in: one column of a two-column paper
    page_width: int = 696  # 7.25 in: a figure* across both columns
    max_height: int = 720
    scale: float = 3.0  # PNG pixels per px: about 290 dpi at print size
    show_title: bool = False  # a paper's caption carries the title; captions.md keeps them


PAPER = PaperStyle()


def paper_layout(fig: go.Figure, *, wide: bool = False, style: PaperStyle = PAPER) -> go.Figure:
    """A copy of ``fig`` in the paper style: white background, one font, the palette, sized for a
    column (or the page with ``wide``) at the figure's own aspect ratio. Data are untouched."""
    out = go.Figure(fig)
    width = style.page_width if wide else style.column_width
    w0, h0 = fig.layout.width or 700, fig.layout.height or 450
    # the legend sits above the plot: grow the figure by its rows so it never covers the data
    height = min(style.max_height, round(h0 * width / w0)) + _legend_height(fig, width, style)
    title = fig.layout.title.text if style.show_title else None
    out.update_layout(
        template="simple_white",
        font={"family": style.font_family, "size": style.font_size, "color": "black"},
        title={"text": title, "x": 0.5, "font": {"size": style.font_size + 1}},
        colorway=list(PALETTE),
        paper_bgcolor="white",
        plot_bgcolor="white",
        width=width,
        height=height,
        margin={"l": 10, "r": 10, "t": 30 if title else 10, "b": 10, "autoexpand": True},
        # above the plot, left-aligned: at column width a legend on the right halves the plot
        legend={
            "font": {"size": style.font_size - 1},
            "orientation": "h",
            "x": 0,
            "xanchor": "left",
            "y": 1.0,
            "yanchor": "bottom",
            "bgcolor": "rgba(0,0,0,0)",
        },
    )
    out.update_xaxes(automargin=True, title_standoff=4)
    out.update_yaxes(automargin=True, title_standoff=4)
    if any(t.type == "scatter3d" for t in out.data):  # the default camera crops the axis titles
        out.update_layout(
            scene_camera_eye={"x": 1.6, "y": 1.6, "z": 0.9},
            margin={"l": 10, "r": 10, "t": 30, "b": 0},
        )
    return out


def _legend_height(fig: go.Figure, width: int, style: PaperStyle) -> int:
    """Pixels a horizontal legend of ``fig``'s entries takes at ``width`` (0 without one).

    Entries are laid out in rows of equal slots sized for the longest name (symbol ~40 px plus
    ~0.6 em per character), a row ~3 font sizes high (measured on kaleido renders).
    """
    names = [t.name for t in fig.data if t.name and t.showlegend is not False]
    if not names or fig.layout.showlegend is False:
        return 0
    font = style.font_size - 1
    slot = 40 + 0.6 * font * max(len(n) for n in names)
    per_row = max(1, int((width - 20) // slot))
    return math.ceil(len(names) / per_row) * (3 * font + 1)
