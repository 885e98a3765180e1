"""Where the bundled data lives: the demo mixtures and their bases, committed under ``data/``.

Plain paths, so that resolving the names ``demo`` (a mixture or a model) imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA_DIR", "DEMO_COLLAPSE_DIR", "DEMO_DIR", "DEMO_VL_DIR"]

DATA_DIR: Path = Path(__file__).resolve().parents[2] / "data"
DEMO_DIR: Path = DATA_DIR / "demo"  # the text demo (mixture and base)
DEMO_VL_DIR: Path = DATA_DIR / "demo-vl"  # the image-text demo (mixture and base)
DEMO_COLLAPSE_DIR: Path = DATA_DIR / "demo-collapse"  # the short-answer collapse demo
