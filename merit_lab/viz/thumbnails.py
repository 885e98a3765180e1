"""The image-text conflict space with pictures: sources in PCA space, their images on hover.

Input: a run's ``ConflictSpace`` and the image-text `Mixture`. Output: a figure with a thumbnail
of each source's first picture beside its point (static: it survives HTML and PNG export), and a
widget whose side pane shows the hovered source's pictures, question and answers (a plotly hover
label cannot hold an image, so the pane is an ``ipywidgets.HTML`` updated by ``on_hover``; without
a live ``FigureWidget`` a dropdown picks the source).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.data.mixture import Mixture
from merit_lab.data.multimodal import example_images, load_image
from merit_lab.viz.figure_view import FigureView
from merit_lab.viz.style import color_map, layout

__all__ = [
    "SourcePictures",
    "ThumbnailExplorer",
    "pictures_html",
    "plot_conflict_thumbnails",
    "source_pictures",
]


@dataclass(frozen=True)
class SourcePictures:
    """A few examples of one source: each picture as a PNG data URI, its question and answer."""

    name: str
    images: tuple[str, ...]  # data:image/png;base64,...
    questions: tuple[str, ...]
    answers: tuple[str, ...]


def _data_uri(path: str, side: int) -> str:
    img = load_image(path).resize((side, side))  # nearest-enough at these sizes
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def source_pictures(
    mixture: Mixture, *, split: str = "eval", n: int = 4, side: int = 64
) -> dict[str, SourcePictures]:
    """The first ``n`` image examples of each source's ``split``, pictures scaled to ``side``
    pixels; sources without an image example are left out."""
    out = {}
    for source in mixture:
        rows = [ex for ex in source.split(split) if example_images(ex)][:n]
        if not rows:
            continue
        questions = [
            " ".join(p["text"] for p in ex["messages"][0]["content"] if p["type"] == "text")
            for ex in rows
        ]
        out[source.name] = SourcePictures(
            source.name,
            tuple(_data_uri(example_images(ex)[0], side) for ex in rows),
            tuple(questions),
            tuple(ex["messages"][-1]["content"] for ex in rows),
        )
    return out


def plot_conflict_thumbnails(
    space: ConflictSpace,
    pictures: Mapping[str, SourcePictures],
    labels: Mapping[str, str] | None = None,
    *,
    size: float = 0.07,
) -> go.Figure:
    """PC1 vs PC2 with each source's first picture drawn beside its point.

    Args:
        pictures: `source_pictures` output (sources without one get no thumbnail).
        labels: source → a label to colour by (e.g. a planted axis); one trace per label.
        size: thumbnail side as a fraction of the wider axis range.
    """
    z = space.coords(2)
    names = list(space.names)
    labels = dict(labels or {})
    values = [str(labels.get(n, "source")) for n in names]
    colors = color_map(values)
    fig = go.Figure()
    for v in sorted(colors, key=str):
        idx = [i for i, x in enumerate(values) if x == v]
        fig.add_trace(
            go.Scatter(
                x=z[idx, 0],
                y=z[idx, 1],
                mode="markers",
                name=v,
                marker={"color": colors[v], "size": 9, "line": {"width": 1, "color": "white"}},
                customdata=[names[i] for i in idx],
                hovertemplate="<b>%{customdata}</b><extra></extra>",
            )
        )
    span = max(float(np.ptp(z[:, 0])), float(np.ptp(z[:, 1])), 1e-12)
    side = size * span
    for i, name in enumerate(names):
        if name in pictures:
            fig.add_layout_image(
                source=pictures[name].images[0],
                x=z[i, 0] + 0.3 * side,
                y=z[i, 1] + 0.3 * side,
                xref="x",
                yref="y",
                sizex=side,
                sizey=side,
                xanchor="left",
                yanchor="bottom",
                layer="above",
            )
    ev = space.explained_variance_ratio
    pad = 1.5 * side
    return layout(
        fig,
        "Conflict space with each source's first picture",
        xaxis={
            "title": f"PC1 ({100 * ev[0]:.0f}%)",
            "range": [z[:, 0].min() - pad, z[:, 0].max() + 2 * pad],
        },
        yaxis={
            "title": f"PC2 ({100 * ev[1]:.0f}%)",
            "range": [z[:, 1].min() - pad, z[:, 1].max() + 2 * pad],
        },
        height=520,
    )


def pictures_html(pictures: SourcePictures) -> str:
    """A source's pictures with their questions and answers, as HTML for the side pane."""
    cells = "".join(
        f'<div style="display:inline-block;margin:4px;text-align:center;width:110px">'
        f'<img src="{uri}" width="96" height="96" style="image-rendering:pixelated"><br>'
        f"<small>{html.escape(q)}</small><br><code>{html.escape(a)}</code></div>"
        for uri, q, a in zip(pictures.images, pictures.questions, pictures.answers, strict=True)
    )
    return f"<b>{html.escape(pictures.name)}</b><br>{cells}"


class ThumbnailExplorer:
    """The thumbnail figure and a pane with the hovered (or chosen) source's pictures.

    Attributes:
        figure: `plot_conflict_thumbnails`' figure, live when anywidget is installed.
        pane: the ``ipywidgets.HTML`` side pane; ``source``: the dropdown that also fills it.
        view: the widget to display.
    """

    def __init__(
        self,
        space: ConflictSpace,
        pictures: Mapping[str, SourcePictures],
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.pictures = dict(pictures)
        self.figure = FigureView(plot_conflict_thumbnails(space, self.pictures, labels))
        self.pane = widgets.HTML()
        names: Sequence[str] = [n for n in space.names if n in self.pictures]
        self.source = widgets.Dropdown(options=names, description="source")
        self.source.observe(lambda change: self.show(change["new"]), names="value")
        if self.figure.live:
            for trace in self.figure.fig.data:
                trace.on_hover(self._on_hover)
        self.view = widgets.VBox([self.figure.view, self.source, self.pane])
        if names:
            self.show(names[0])

    def show(self, name: str) -> str:
        """Fill the pane with ``name``'s pictures; returns the HTML."""
        self.pane.value = pictures_html(self.pictures[name]) if name in self.pictures else ""
        return self.pane.value

    def _on_hover(self, trace: Any, points: Any, _state: Any) -> None:
        if points.point_inds:
            self.show(trace.customdata[points.point_inds[0]])
