"""The bundled demo: a synthetic instruction mixture with planted conflicts and a tiny base model.

``generate_demo_mixture`` writes the mixture, ``pretrain_demo_base`` trains θ0 on a separate draw,
and ``DEMO_DIR`` is where both are committed (``data/demo``).
"""

from __future__ import annotations

from pathlib import Path

from merit_lab.demo.base import build_demo_tokenizer, pretrain_demo_base
from merit_lab.demo.tasks import generate_demo_mixture
from merit_lab.demo.vl_base import pretrain_vl_base
from merit_lab.demo.vl_tasks import generate_vl_mixture

__all__ = [
    "DEMO_DIR",
    "DEMO_VL_DIR",
    "build_demo_tokenizer",
    "generate_demo_mixture",
    "generate_vl_mixture",
    "pretrain_demo_base",
    "pretrain_vl_base",
]

DEMO_DIR: Path = Path(__file__).resolve().parents[2] / "data" / "demo"
DEMO_VL_DIR: Path = DEMO_DIR.parent / "demo-vl"  # the image-text demo (mixture and base)
