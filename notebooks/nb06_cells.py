"""Cells of notebook 06, image-text models (imported by build_notebooks.py)."""

from __future__ import annotations

__all__ = ["NB06"]

# The same parameters cell opening as build_notebooks.SETUP.
SETUP = """import os
from pathlib import Path

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
SMOKE = os.environ.get("MERIT_SMOKE") == "1"  # tests set this: tiny settings, same code path
OUTPUT_DIR = os.environ.get("MERIT_OUTPUT_DIR", str(ROOT / "runs"))"""

NB06 = [
    (
        "md",
        """# 06 · Image-text models: the conflict space of a picture-question mixture

The paper's main setting is image-text instruction tuning (Qwen2.5-VL). merit-lab runs every
stage on such a model: a vision tower, a projector that turns image patches into tokens, and a
language model. This notebook uses the bundled image-text demo:

- **θ0** (`data/demo-vl/base`): a tiny Qwen2-VL (0.5M parameters: a 2-block vision tower over
  4-pixel patches, the 2×2 patch merger, a 2-layer language model), a character-level tokenizer
  with Qwen2-VL's special tokens, and its image processor;
- **the mixture** (`data/demo-vl`): 16 sources of questions about generated 32×32 pictures, in
  four families (colour, shape, count, position). Two answer conventions are *planted*:
  `style` (`red` or `Answer: red.`) and `case` (`red` or `RED`). The four sources of a family
  see the very same pictures and questions and differ only in the answer.

An example is a chat whose user turn holds content parts:
`{"type": "image", "image": "images/colour/train-000.png"}` (a path relative to the mixture
folder) and `{"type": "text", "text": "What colour is the shape?"}`.""",
    ),
    (
        "code",
        """from IPython.display import HTML

from merit_lab.config.schema import load_config
from merit_lab.analysis.conflict import ConflictSpace
from merit_lab.data.formatting import IGNORE_INDEX, tokenize_example
from merit_lab.data.mixture import load_mixture
from merit_lab.models.loading import load_tokenizer
from merit_lab.pipeline import load_source_table, run_pipeline, run_summary
from merit_lab.viz.plots import plot_conflict_scatter, plot_explained_variance
from merit_lab.viz.thumbnails import (
    ThumbnailExplorer,
    pictures_html,
    plot_conflict_thumbnails,
    source_pictures,
)""",
    ),
    (
        "md",
        "**Parameters.** `MERIT_SMOKE=1` shrinks the calibration set so the tests run this "
        "notebook in seconds; everything else is `configs/demo-vl.yaml`.",
    ),
    (
        "code",
        SETUP
        + """
DEMO_VL = ROOT / "data" / "demo-vl"  # the config's paths are relative to the repository root
overrides = {"output_dir": OUTPUT_DIR, "model": str(DEMO_VL / "base"), "mixture": str(DEMO_VL)}
if SMOKE:
    overrides |= {"name": "nb06-smoke", "calibration": {"n": 8, "micro_batch_size": 8}}
cfg = load_config(ROOT / "configs" / "demo-vl.yaml", **overrides)
mixture = load_mixture(DEMO_VL, calibration_n=cfg.calibration.n)""",
    ),
    (
        "md",
        """## 1 · One example, as the model sees it

`load_tokenizer` returns the tokenizer together with the model's image processor. The chat
template renders an image part as `<|vision_start|><|image_pad|><|vision_end|>`; tokenisation
widens the placeholder to one token per merged patch (16 here) and turns the picture into
patches (`pixel_values`, 64 patches of 3·2·4·4 values) and their grid (`image_grid_thw`).
Only the answer is scored: every image, vision and prompt token has label −100.""",
    ),
    (
        "code",
        """tok = load_tokenizer(cfg.model)
example = mixture["colour-verbose-upper"].train[0]
t = tokenize_example(tok, example)
scored = [i for i, y in enumerate(t.labels) if y != IGNORE_INDEX]
print(tok.decode(t.input_ids))
print("scored tokens:", repr(tok.decode([t.input_ids[i] for i in scored])))
print("pixel_values", tuple(t.pixel_values.shape), "image_grid_thw", t.image_grid_thw.tolist())""",
    ),
    (
        "md",
        """The same picture and question in the four sources of its family: only the answer
changes. This is the conflict MERIT has to find from gradients alone.""",
    ),
    (
        "code",
        """pictures = source_pictures(mixture, split="train", n=3)
HTML(
    "".join(
        pictures_html(pictures[f"colour-{s}"])
        for s in ["terse-lower", "terse-upper", "verbose-lower", "verbose-upper"]
    )
)""",
    ),
    (
        "md",
        """## 2 · Gradients at θ0, conflict space, partition

The stages are the text pipeline's: a gradient per source over its calibration examples (the
batches carry the pixels; here on all parameters, `parameters.preset` can restrict them to
`language`, `vision` or `projector`), their cosines and PCA, and the balanced split. The same
call is `merit-lab run configs/demo-vl.yaml --stages mixture gradients conflict partition`.""",
    ),
    (
        "code",
        """run = run_pipeline(cfg, ["mixture", "gradients", "conflict", "partition"])
print(run_summary(run.root))
space = ConflictSpace.load(run.conflict)
table = load_source_table(run.root)""",
    ),
    ("code", 'plot_conflict_scatter(space, table, color="style")'),
    ("code", 'plot_conflict_scatter(space, table, color="case")'),
    ("code", "plot_explained_variance(space)"),
    (
        "md",
        """## 3 · The conflict space with its pictures

A plotly hover label cannot hold an image, so the figure draws each source's first picture
beside its point (this survives HTML and PNG export), and the explorer below adds a pane that
shows the hovered source's pictures, questions and answers (in a live notebook with anywidget;
otherwise pick the source from the dropdown). Sources that share pictures sit apart exactly
when their answer conventions differ.""",
    ),
    (
        "code",
        """labels = dict(zip(table.index, table["style"] + " · " + table["case"], strict=True))
plot_conflict_thumbnails(space, pictures, labels)""",
    ),
    (
        "code",
        """explorer = ThumbnailExplorer(space, pictures, labels)
explorer.view""",
    ),
    (
        "md",
        """## 4 · What the partition found

The r = 2 split against the planted labels: a clean diagonal means the four groups are the four
answer conventions. The branches, merges, evaluation (held-out loss and greedy answers with the
pictures) and report run as for text: `merit-lab run configs/demo-vl.yaml`.""",
    ),
    (
        "code",
        """import pandas as pd

pd.crosstab(table["group"], [table["style"], table["case"]])""",
    ),
]
