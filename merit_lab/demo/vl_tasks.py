"""Image-text demo mixture: generated pictures, four question families, two planted answer axes.

Writes ``images/`` (small PNGs), ``train/``, ``calibration/`` and ``eval/`` folders of JSONL
files in ``messages`` format with image content parts (paths relative to the mixture folder),
plus ``sources.json``, the ground truth the conflict space should recover.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from merit_lab.io import atomic_dir, atomic_write_json

__all__ = [
    "VL_AXES",
    "VL_FAMILIES",
    "VLDemoSource",
    "draw_scene",
    "format_answer",
    "generate_vl_mixture",
    "sample_vl_example",
    "vl_sources",
]

# The planted axes, as in the text demo: one global answer convention each, applied alike in
# every family and never revealed by the prompt. `style`: `red` or `Answer: red.`; `case`:
# `red` or `RED`. Sources that differ on an axis see the very same images and questions.
VL_AXES: tuple[str, str] = ("style", "case")
STYLES: tuple[str, str] = ("terse", "verbose")
CASES: tuple[str, str] = ("lower", "upper")
SPLITS: tuple[str, str, str] = ("train", "calibration", "eval")
SIZE = 32  # image side in pixels: 8×8 patches of 4 pixels, 16 image tokens after the 2×2 merge
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 200, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four")
PLACES: dict[str, tuple[int, int]] = {  # centre (x, y) of a shape at each place
    "left": (8, 16),
    "right": (24, 16),
    "top": (16, 8),
    "bottom": (16, 24),
}
QUESTIONS: dict[str, str] = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "count": "How many squares?",
    "position": "Where is the shape?",
}
VL_FAMILIES: tuple[str, ...] = tuple(QUESTIONS)


@dataclass(frozen=True)
class VLDemoSource:
    """One image-text demo source: a question family under one answer style and case."""

    family: str  # colour, shape, count or position (see VL_FAMILIES)
    style: str  # planted axis 1: "terse" (`red`) or "verbose" (`Answer: red.`)
    case: str  # planted axis 2: "lower" (`red`) or "upper" (`RED`)

    @property
    def name(self) -> str:
        """File stem and source name, e.g. ``colour-terse-lower``."""
        return f"{self.family}-{self.style}-{self.case}"

    @property
    def description(self) -> str:
        shape = "Answer: <answer>." if self.style == "verbose" else "<answer>"
        return f'{self.family} ("{QUESTIONS[self.family]}"), answers as {shape} in {self.case} case'


def vl_sources() -> list[VLDemoSource]:
    """All 16 sources: 4 families × 2 styles × 2 cases, in a fixed order."""
    return [VLDemoSource(f, s, c) for f in VL_FAMILIES for s in STYLES for c in CASES]


def _blank() -> np.ndarray:
    return np.full((SIZE, SIZE, 3), 245, dtype=np.uint8)


def _paint(img: np.ndarray, shape: str, colour: str, cx: int, cy: int, r: int) -> None:
    """Draw a filled shape of half-size ``r`` centred at (cx, cy)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        inside = (abs(x - cx) <= r - 1) & (abs(y - cy) <= r - 1)
    else:  # triangle, apex up
        inside = (y >= cy - r) & (y <= cy + r) & (abs(x - cx) <= (y - (cy - r)) / 2)
    img[inside] = COLOURS[colour]


def draw_scene(family: str, rng: random.Random) -> tuple[np.ndarray, str]:
    """One picture of ``family`` and its answer word: (SIZE, SIZE, 3) uint8 RGB, e.g. "red"."""
    img = _blank()
    colour = rng.choice(list(COLOURS))
    if family == "count":
        n = rng.randint(1, len(NUMBERS))
        cells = rng.sample([(x, y) for x in range(3) for y in range(3)], n)
        for x, y in cells:
            _paint(img, "square", colour, 6 + 10 * x, 6 + 10 * y, 3)
        return img, NUMBERS[n - 1]
    shape = rng.choice(SHAPES)
    if family == "position":
        place = rng.choice(list(PLACES))
        cx, cy = PLACES[place]
        _paint(img, shape, colour, cx + rng.randint(-1, 1), cy + rng.randint(-1, 1), 5)
        return img, place
    cx, cy = rng.randint(11, 21), rng.randint(11, 21)
    _paint(img, shape, colour, cx, cy, rng.randint(6, 8))
    return img, colour if family == "colour" else shape


def format_answer(source: VLDemoSource, word: str) -> str:
    """The answer ``source`` gives: its case, then its style."""
    word = word.upper() if source.case == "upper" else word
    return f"Answer: {word}." if source.style == "verbose" else word


def sample_vl_example(source: VLDemoSource, image: object, word: str) -> dict:
    """One example of ``source`` about ``image`` (a path, or a PIL image in pretraining)."""
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": image},
                    {"type": "text", "text": QUESTIONS[source.family]},
                ],
            },
            {"role": "assistant", "content": format_answer(source, word)},
        ]
    }


def _png(img: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def generate_vl_mixture(
    out_dir: Path,
    *,
    seed: int = 0,
    n_train: int = 96,
    n_calibration: int = 48,
    n_eval: int = 24,
) -> Path:
    """Write the image-text demo mixture; a pure function of the arguments (same bytes again).

    The pictures of a family and split are drawn once (seeded by family and split) and shared by
    the family's four sources, which differ only in the answer convention.

    Args:
        out_dir: Folder to write into (``images/`` and the split folders are replaced whole).
        seed: Seed of every draw.
        n_train: Training examples per source.
        n_calibration: Calibration examples per source (the gradient sample).
        n_eval: Held-out evaluation examples per source.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    sizes = {"train": n_train, "calibration": n_calibration, "eval": n_eval}
    pngs: dict[str, bytes] = {}
    scenes: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for family in VL_FAMILIES:
        for split in SPLITS:
            rng = random.Random(f"merit-lab-demo-vl:{seed}:{family}:{split}")
            rows = []
            for i in range(sizes[split]):
                img, word = draw_scene(family, rng)
                rel = f"images/{family}/{split}-{i:03d}.png"
                pngs[rel] = _png(img)
                rows.append((rel, word))
            scenes[family, split] = rows
    with atomic_dir(out_dir / "images", overwrite=True) as tmp:
        for rel, data in pngs.items():
            path = tmp / Path(rel).relative_to("images")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    for split in SPLITS:
        with atomic_dir(out_dir / split, overwrite=True) as tmp:
            for source in vl_sources():
                lines = [
                    json.dumps(
                        {"id": f"{source.name}-{split}-{i}", **sample_vl_example(source, rel, w)}
                    )
                    + "\n"
                    for i, (rel, w) in enumerate(scenes[source.family, split])
                ]
                (tmp / f"{source.name}.jsonl").write_text("".join(lines), encoding="utf-8")
    meta = {
        "seed": seed,
        "axes": list(VL_AXES),
        "families": list(VL_FAMILIES),
        "sizes": sizes,
        "image_size": SIZE,
        "sources": {
            s.name: {
                "family": s.family,
                "style": s.style,
                "case": s.case,
                "description": s.description,
            }
            for s in vl_sources()
        },
    }
    atomic_write_json(out_dir / "sources.json", meta)
    return out_dir
