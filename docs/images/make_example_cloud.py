"""A browser screenshot of the example cloud on a small real run (6 demo sources, n = 40).

Run from the repository root: `.venv/bin/python -m docs.images.make_example_cloud` (needs
/usr/bin/chromium; about a minute on 2 cores). Writes docs/images/example_cloud_browser.png.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from playwright.sync_api import sync_playwright

from merit_lab.config.schema import load_config
from merit_lab.pipeline import load_source_table, run_pipeline
from merit_lab.pipeline.examples import compute_example_sketches, load_example_table
from merit_lab.viz.plots_examples import plot_example_cloud
from tests.conftest import write_demo_slice

SOURCES = [
    "reverse-a-terse-lower",
    "reverse-a-verbose-lower",
    "shift-a-terse-upper",
    "shift-a-verbose-upper",
    "rotate-a-terse-lower",
    "rotate-a-verbose-upper",
]
OUT = Path(__file__).resolve().parent / "example_cloud_browser.png"


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="merit-cloud-"))
    mix = write_demo_slice(out / "mix", SOURCES, {"train": 16, "calibration": 40, "eval": 4})
    config = {
        "name": "cloud",
        "mixture": str(mix),
        "output_dir": str(out / "runs"),
        "calibration": {"n": 40, "micro_batch_size": 40},
        "partition": {"method": "balanced", "r": 1},
        "experiments": [{"name": "merit-1d", "method": "balanced", "r": 1}],
    }
    (out / "cfg.yaml").write_text(yaml.safe_dump(config))
    run = run_pipeline(load_config(out / "cfg.yaml"), until="partition")
    compute_example_sketches(run.root, progress=False)
    table = load_example_table(run.root)
    fig = plot_example_cloud(run.load_space(), table, SOURCES[0], load_source_table(run.root))
    fig.update_layout(width=1100, height=700)
    fig.write_html(out / "cloud.html", include_plotlyjs=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium")
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(f"file://{out / 'cloud.html'}")
        page.wait_for_timeout(1500)
        traces = page.locator(".scatterlayer .trace")
        for i in range(traces.count()):
            points = traces.nth(i).locator(".point")
            if points.count() >= 30:  # the examples' trace: hover one to show its text
                points.nth(7).hover(force=True)
                break
        page.wait_for_timeout(600)
        page.screenshot(path=str(OUT))
        browser.close()
    print(f"wrote {OUT} ({len(table)} examples)")


if __name__ == "__main__":
    main()
