"""The curation workbench in a real browser: JupyterLab + headless Chromium (Playwright).

Runs every cell of notebook 04 in the smoke setting, then with the editor's dropdowns and buttons
moves a source between groups ("Move"), drops another ("Drop"), keeps a quarter of a third
("Down-weight"), presses "Save", and checks partition.json on disk: the groups, ``dropped``,
``fractions``, the exact token count of the kept subset and the edit log. Screenshots go
to tests/artifacts/ (gitignored). Needs /usr/bin/chromium and the playwright package; never
downloads a browser.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from merit_lab.config.schema import load_config
from merit_lab.partition.session import fraction_subset

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
NOTEBOOK = "04_curation_workbench.ipynb"
RUN_NAME = "nb04-smoke"  # the notebook's run name in the smoke setting
RUN_ALL_TIMEOUT_S = 240


def _skip_reason() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (Debian/Ubuntu: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; no browser download needed)"
    return None


def _notebook() -> nbformat.NotebookNode:
    """The committed notebook, as a person last saved it in Jupyter."""
    return nbformat.read(REPO / "notebooks" / NOTEBOOK, as_version=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(folder: Path) -> None:
    """Lab settings for a test: every cell in the DOM, no news or update pop-ups."""
    settings = {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
            "fetchNews": "false",
            "checkForUpdates": False,
        },
    }
    for rel, value in settings.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict]:
    """A JupyterLab server on a copy of the notebook (the repository's files stay untouched)."""
    root = tmp_path / "lab"
    (root / "notebooks").mkdir(parents=True)
    shutil.copytree(REPO / "configs", root / "configs")
    nbformat.write(_notebook(), root / "notebooks" / NOTEBOOK)
    runs = tmp_path / "runs"
    _write_settings(tmp_path / "settings")
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "MERIT_SMOKE": "1",
        "MERIT_OUTPUT_DIR": str(runs),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "OMP_NUM_THREADS": "1",
    }
    log = (tmp_path / "lab.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            f"--port={port}",
            "--ServerApp.ip=127.0.0.1",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--ServerApp.allow_root=True",
            "--ServerApp.terminals_enabled=False",
            "--LabApp.news_url=None",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'lab.log').read_text()}")
                time.sleep(0.5)
        yield {"url": url, "token": token, "runs": runs, "log": tmp_path / "lab.log"}
    finally:
        proc.send_signal(signal.SIGINT)  # the server shuts its kernels down on SIGINT
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: the server and its kernel
            proc.wait(timeout=10)
        log.close()


def _accept_kernel_dialog(page) -> None:
    """Lab may ask which kernel to start (a fresh settings folder): take the one proposed."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    select = page.locator(".jp-Dialog").get_by_role("button", name="Select", exact=True)
    with contextlib.suppress(PlaywrightTimeout):  # no dialog: the kernel started by itself
        select.click(timeout=15_000)


def _wait_for_run_all(page, timeout_s: float) -> None:
    """Every code cell has run ("[n]:" prompts, none "[*]:") and the kernel is idle."""
    page.wait_for_function(
        """() => {
            const prompts = [...document.querySelectorAll(
                '.jp-Notebook .jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent.trim());
            const idle = document.querySelector('.jp-Notebook-ExecutionIndicator');
            return prompts.length > 0 && prompts.every(p => /^\\[\\d+\\]:$/.test(p))
                && (!idle || idle.getAttribute('data-status') === 'idle');
        }""",
        timeout=timeout_s * 1000,
        polling=1000,
    )


def _select_source(select, name: str) -> None:
    """Pick ``name`` in the editor's source dropdown (labels read "name (G<k>)", with " ⚠" after
    a source that changes group between calibration folds)."""
    labels = select.locator("option").evaluate_all(
        "options => options.map(o => o.textContent.trim())"
    )
    # ipywidgets shows spaces in option labels as no-break spaces: \s matches both
    index = next(
        i
        for i, lab in enumerate(labels)
        if re.fullmatch(rf"{re.escape(name)}\s\(G\d+\)(\s⚠)?", lab)
    )
    select.select_option(index=index)


@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_workbench_edits_and_saves_partition_json(lab):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    for old in ARTIFACTS.glob("workbench_*.png"):  # no stale picture from an earlier run
        old.unlink()
    partition_path = lab["runs"] / RUN_NAME / "partition.json"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1500})
        try:
            page.goto(f"{lab['url']}/lab/tree/notebooks/{NOTEBOOK}?token={lab['token']}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            _accept_kernel_dialog(page)
            expect(page.locator(".jp-Notebook-ExecutionIndicator")).to_have_attribute(
                "data-status", "idle", timeout=90_000
            )
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
            _wait_for_run_all(page, RUN_ALL_TIMEOUT_S)
            page.screenshot(path=ARTIFACTS / "workbench_run_all.png")
            tracebacks = page.locator(".jp-OutputArea-output", has_text="Traceback")
            assert tracebacks.count() == 0, tracebacks.first.inner_text()

            move = page.get_by_role("button", name="Move", exact=True)
            row = page.locator(".widget-hbox").filter(has=move)
            editor = page.locator(".jp-OutputArea-output").filter(has=move)
            expect(move).to_have_count(1)
            move.scroll_into_view_if_needed()
            editor.screenshot(path=ARTIFACTS / "workbench_editor_before.png")

            before = json.loads(partition_path.read_text())
            source_select, target_select = (
                row.locator("select").nth(0),
                row.locator("select").nth(1),
            )
            labels = source_select.locator("option").evaluate_all(
                "options => options.map(o => o.textContent.trim())"
            )
            # ipywidgets shows spaces in option labels as no-break spaces: \s matches both
            match = re.fullmatch(r"(.+)\s\(G(\d+)\)(?:\s⚠)?", labels[0] if labels else "")
            assert match, f"unexpected source options: {labels[:3]}"
            name, group = match.groups()
            frm = int(group)
            assert name in before["groups"][frm]
            to = (frm + 1) % len(before["groups"])
            source_select.select_option(index=0)
            target_select.select_option(label=f"G{to}")
            move.click()
            expect(editor).to_contain_text(f"moved {name} from G{frm} to G{to}", timeout=30_000)

            # Drop a source of the group that just grew (it keeps at least two).
            gone = before["groups"][to][0]
            drop = page.get_by_role("button", name="Drop", exact=True)
            _select_source(source_select, gone)
            drop.click()
            expect(editor).to_contain_text(f"dropped {gone} from G{to}", timeout=30_000)

            # Keep a quarter of another source: type the fraction, then "Down-weight".
            light = next(s for s in before["groups"][frm] if s != name)
            _select_source(source_select, light)
            fraction = page.locator(".widget-hbox").filter(has=drop).locator("input")
            fraction.fill("0.25")
            fraction.press("Enter")  # a text widget syncs its value on Enter or blur
            page.get_by_role("button", name="Down-weight", exact=True).click()
            expect(editor).to_contain_text(f"down-weighted {light} to 0.25", timeout=30_000)

            save_row = page.locator(".widget-hbox").filter(
                has=page.get_by_role("button", name="Undo", exact=True)
            )
            save_row.get_by_role("button", name="Save", exact=True).click()
            expect(editor).to_contain_text("saved ", timeout=30_000)
            editor.screenshot(path=ARTIFACTS / "workbench_editor_after.png")
        except Exception:
            page.screenshot(path=ARTIFACTS / "workbench_failure.png", full_page=True)
            raise
        finally:
            browser.close()

    after = json.loads(partition_path.read_text())
    assert name in after["groups"][to] and name not in after["groups"][frm]
    assert len(after["edit_log"]) == len(before["edit_log"]) + 3
    move_entry, drop_entry, down_entry = after["edit_log"][-3:]
    assert (move_entry["op"], move_entry["source"], move_entry["from"], move_entry["to"]) == (
        "move",
        name,
        frm,
        to,
    )
    assert move_entry["who"] and move_entry["at"]
    untouched = [g for k, g in enumerate(before["groups"]) if k not in (frm, to)]
    assert untouched == [g for k, g in enumerate(after["groups"]) if k not in (frm, to)]
    # The drop: out of every group and listed, with no counts left.
    assert (drop_entry["op"], drop_entry["source"], drop_entry["from"]) == ("drop", gone, to)
    assert after["dropped"] == [gone]
    assert all(gone not in g for g in after["groups"]) and gone not in after["tokens"]
    # The down-weight: the fraction, and exactly the examples and tokens of the seeded subset.
    assert (down_entry["op"], down_entry["source"], down_entry["to"]) == ("downweight", light, 0.25)
    assert after["fractions"] == {light: 0.25}
    run = lab["runs"] / RUN_NAME
    per_example = {  # the size unit of splits and weights: response tokens
        s["name"]: s["train_example_response_tokens"]
        for s in json.loads((run / "mixture.json").read_text())["sources"]
    }[light]
    kept = fraction_subset(light, len(per_example), 0.25, load_config(run / "config.yaml").seed)
    assert after["examples"][light] == len(kept) == round(0.25 * len(per_example))
    assert after["tokens"][light] == sum(per_example[i] for i in kept)
    assert sum(after["weights"]) == pytest.approx(1.0)
