"""Writing figures to files: HTML always, PNG/SVG/PDF through kaleido when a browser exists.

Input: ``go.Figure`` objects and the file stems or folder to write. Output: ``<stem>.html`` (and
images) per figure; `write_figure_files` renders a whole batch with one Chromium;
`make_contact_sheet` tiles the PNGs on one image for a quick look.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import plotly.graph_objects as go

from merit_lab.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "FIGURE_FORMATS",
    "STATIC_FORMATS",
    "SYSTEM_CHROMIUM",
    "export_static",
    "make_contact_sheet",
    "save_figure",
    "static_renderer_problem",
    "write_figure_files",
]

log = logging.getLogger(__name__)

SYSTEM_CHROMIUM = "/usr/bin/chromium"  # Debian/Ubuntu: `apt-get install chromium`
STATIC_FORMATS = ("png", "svg", "pdf")
FIGURE_FORMATS = ("html", "json", *STATIC_FORMATS)


def static_renderer_problem() -> str | None:
    """Why static export (PNG/SVG/PDF) cannot run here, or None when it can.

    Kaleido ≥ 1 drives a Chromium/Chrome that choreographer finds: ``BROWSER_PATH`` first, then
    the usual names on ``PATH`` and install locations. When it finds none but Debian's
    ``/usr/bin/chromium`` is there, ``BROWSER_PATH`` is set to it for this process.
    """
    import importlib.metadata as md

    try:
        version = md.version("kaleido")
    except md.PackageNotFoundError:
        return "kaleido is not installed: pip install 'kaleido>=1'"
    if int(version.split(".")[0]) < 1:
        return f"kaleido {version} is too old for plotly here: pip install -U 'kaleido>=1'"
    if os.environ.get("BROWSER_PATH"):
        return None
    try:
        from choreographer.browsers.chromium import Chromium

        found = Chromium.find_browser(skip_local=False)
    except Exception:  # an older choreographer: fall through to the system Chromium check
        found = None
    if found:
        return None
    if os.access(SYSTEM_CHROMIUM, os.X_OK):
        os.environ["BROWSER_PATH"] = SYSTEM_CHROMIUM
        return None
    return (
        "kaleido found no Chromium or Chrome: `apt-get install chromium` (Debian/Ubuntu), "
        "`plotly_get_chrome` (downloads Chrome for Testing), or set BROWSER_PATH to a browser"
    )


def save_figure(
    fig: go.Figure, stem: str | Path, *, formats: Sequence[str] = ("png", "svg")
) -> list[Path]:
    """Write ``<stem>.html`` always, plus static images when a renderer (kaleido) is available.

    Returns:
        The files written. A missing static renderer is logged (with how to install it), not
        raised: the HTML holds the figure either way.
    """
    stem = Path(stem)
    written = [atomic_write_text(stem.with_suffix(".html"), fig.to_html(include_plotlyjs=True))]
    problem = static_renderer_problem() if formats else None
    if problem:
        log.warning(
            "static export to %s skipped: %s; the HTML has the figure", "/".join(formats), problem
        )
        return written
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        try:
            written.append(atomic_write_bytes(path, fig.to_image(format=fmt, scale=2)))
        except Exception as e:  # Chromium failed to start or to render
            log.warning("static export to %s skipped (%s); the HTML has the figure", fmt, e)
            break
    return written


def export_static(jobs: Sequence[tuple[go.Figure, Path, str]], scale: float) -> list[Path]:
    """Render every (figure, path, format) with one Chromium (kaleido), not one per image.

    Returns:
        The paths that exist afterwards; a failed render is logged, not raised.
    """
    import kaleido

    specs = [
        {
            "fig": fig,
            "path": str(path),
            "opts": {
                "format": fmt,
                "width": fig.layout.width,
                "height": fig.layout.height,
                "scale": scale,
            },
        }
        for fig, path, fmt in jobs
    ]
    errors = kaleido.write_fig_from_object_sync(specs, kopts={"mathjax": False}) or ()
    for e in errors:
        log.warning("static export failed: %s", e)
    missing = [p for _, p, _ in jobs if not p.exists()]
    if missing:
        log.warning(
            "static export wrote no %s; the HTML has those figures",
            ", ".join(p.name for p in missing),
        )
    return [p for _, p, _ in jobs if p.exists()]


def write_figure_files(
    figs: Mapping[str, go.Figure], out: Path, formats: Sequence[str], *, scale: float = 3.0
) -> list[Path]:
    """Write each figure as ``<out>/<stem>.<format>``, figure by figure, then the images.

    Args:
        figs: file stem → figure (already styled).
        out: an existing folder.
        formats: any of `FIGURE_FORMATS`: "html" (standalone but for one shared
            ``plotly.min.js`` beside it), "json" (plotly JSON), "png", "svg", "pdf".
        scale: PNG pixels per layout px.

    Returns:
        The files written. Without a static renderer the images are skipped with a logged
        message saying what to install.
    """
    from plotly.offline import get_plotlyjs

    written: list[Path] = []
    if "html" in formats and not (out / "plotly.min.js").exists():
        written.append(atomic_write_text(out / "plotly.min.js", get_plotlyjs()))
    for stem, fig in figs.items():
        if "html" in formats:
            html = fig.to_html(
                include_plotlyjs="directory",
                config={"toImageButtonOptions": {"format": "svg", "filename": stem}},
            )
            written.append(atomic_write_text(out / f"{stem}.html", html))
        if "json" in formats:
            written.append(atomic_write_text(out / f"{stem}.json", fig.to_json()))
    static = [f for f in formats if f in STATIC_FORMATS]
    if not static:
        return written
    problem = static_renderer_problem()
    if problem:
        log.warning("PNG/SVG/PDF figures skipped: %s. The HTML files hold every figure.", problem)
        return written
    jobs = [(fig, out / f"{stem}.{fmt}", fmt) for stem, fig in figs.items() for fmt in static]
    for _, path, _ in jobs:
        path.unlink(missing_ok=True)  # so a failed render cannot leave a stale file
    return written + export_static(jobs, scale)


def make_contact_sheet(
    pngs: Mapping[str, Path], path: Path, *, columns: int = 4, cell_width: int = 600
) -> Path:
    """Tile PNGs on one white image, each scaled to ``cell_width`` px with its stem below it.

    Args:
        pngs: caption (a figure's stem) → its PNG file, in reading order (left to right).
        path: the sheet to write (PNG).
        columns: tiles per row.
        cell_width: the width of a tile; heights keep each figure's aspect ratio, and a row is
            as high as its tallest tile plus the caption.

    Returns:
        ``path``, written atomically.
    """
    import io

    from PIL import Image, ImageDraw, ImageFont

    if not pngs:
        raise ValueError("no PNGs to tile on a contact sheet")
    if columns < 1 or cell_width < 50:
        raise ValueError("columns must be >= 1 and cell_width >= 50")
    font = ImageFont.load_default(size=max(12, cell_width // 28))
    caption_h, pad = font.size + 12, 16
    tiles = []
    for caption, file in pngs.items():
        with Image.open(file) as im:
            im = im.convert("RGB")
            h = round(im.height * cell_width / im.width)
            tiles.append((caption, im.resize((cell_width, h), Image.Resampling.LANCZOS)))
    rows = [tiles[i : i + columns] for i in range(0, len(tiles), columns)]
    heights = [max(t.height for _, t in row) + caption_h for row in rows]
    ncols = min(columns, len(tiles))
    size = (ncols * (cell_width + pad) + pad, sum(heights) + pad * (len(rows) + 1))
    sheet = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for row, height in zip(rows, heights, strict=True):
        for c, (caption, tile) in enumerate(row):
            x = pad + c * (cell_width + pad)
            sheet.paste(tile, (x, y))
            draw.rectangle([x - 1, y - 1, x + cell_width, y + tile.height], outline="#CCCCCC")
            draw.text((x, y + tile.height + 4), caption, fill="black", font=font)
        y += height + pad
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return atomic_write_bytes(path, buf.getvalue())
