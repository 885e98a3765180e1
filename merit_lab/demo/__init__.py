"""The bundled demo: a synthetic instruction mixture with planted conflicts and a tiny base model.

``generate_demo_mixture`` writes the mixture, ``pretrain_demo_base`` trains θ0 on a separate draw,
and ``DEMO_DIR`` is where both are committed (``data/demo``).
"""

from __future__ import annotations

from merit_lab.config.paths import DEMO_DIR, DEMO_VL_DIR
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
