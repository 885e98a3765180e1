"""The end of a pytest run says which tiers did not run and why (a pytest plugin; conftest.py).

A skipped test is put in a tier by its skip reason (`REASON_TIERS`), else by its first tier
marker (`MARKER_TIERS`), else "other"; the tests left out by ``-m``/``-k`` are counted by
marker too ("unmarked" for the rest). Under pytest-xdist (`make test`) the workers collect and
deselect, so each worker counts what it left out and hands the counts to the controller.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import pytest

DESELECTED = pytest.StashKey[dict]()  # tier -> tests left out by -m/-k, in this process
FROM_WORKERS = pytest.StashKey[dict]()  # the same, as an xdist worker counted it
WORKER_KEY = "merit_lab_deselected_tiers"

# (tier, pattern in the skip reason): what is missing on this machine, named as a newcomer sees it
REASON_TIERS = (
    ("browser", r"chromium is missing|playwright is not installed"),
    ("static export", r"static renderer"),
    ("smollm2", r"SmolLM2"),
    ("mergekit", r"mergekit"),
    ("lm-eval", r"\blm_eval\b"),
    ("lmms-eval", r"\blmms_eval\b"),
    ("gpu", r"needs CUDA|no CUDA"),
    ("cpu only", r"without CUDA"),
    ("git checkout", r"not a git checkout"),
)
MARKER_TIERS = ("browser", "gpu", "notebook", "slow")


def skip_reason(report) -> str:
    """The reason a skipped report gives (``pytest.skip(reason)`` or ``skipif(reason=...)``)."""
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


def _markers(report) -> list[str]:
    keywords = getattr(report, "keywords", {}) or {}
    return [m for m in MARKER_TIERS if m in keywords]


def tier_of(reason: str, markers: Iterable[str] = ()) -> str:
    """The tier a skip belongs to: by its reason first, then by its markers."""
    for tier, pattern in REASON_TIERS:
        if re.search(pattern, reason):
            return tier
    return next(iter(markers), "other")


def skipped_tiers(reports: Iterable) -> dict[str, tuple[int, list[str]]]:
    """Tier → (number of tests skipped, their distinct reasons in order of first appearance)."""
    tiers: dict[str, tuple[int, list[str]]] = {}
    for report in reports:
        reason = skip_reason(report)
        tier = tier_of(reason, _markers(report))
        n, reasons = tiers.get(tier, (0, []))
        tiers[tier] = (n + 1, reasons if reason in reasons else [*reasons, reason])
    return tiers


def deselected_tiers(items: Iterable, into: dict[str, int] | None = None) -> dict[str, int]:
    """Tier (first tier marker, else "unmarked") → number of ``items``, added to ``into``."""
    left_out = {} if into is None else into
    for item in items:
        tier = next(iter(_markers(item)), "unmarked")
        left_out[tier] = left_out.get(tier, 0) + 1
    return left_out


def summary_lines(
    skipped: Iterable, deselected: Iterable = (), left_out: dict[str, int] | None = None
) -> list[str]:
    """The lines printed at the end of the run: one line of tiers and counts, then the reasons
    (``left_out``: deselected counts by tier, where the items themselves are elsewhere)."""
    tiers = skipped_tiers(skipped)
    lines = []
    if tiers:
        lines.append("skipped tiers: " + ", ".join(f"{t} {n}" for t, (n, _) in tiers.items()))
        lines += [f"  {t}: {'; '.join(reasons)}" for t, (_, reasons) in tiers.items()]
    left_out = deselected_tiers(deselected, dict(left_out or {}))
    if left_out:
        counts = ", ".join(f"{t} {n}" for t, n in left_out.items())
        lines.append(f"deselected tiers (-m/-k): {counts}")
    return lines


def pytest_deselected(items) -> None:
    if items:
        config = items[0].config
        deselected_tiers(items, config.stash.setdefault(DESELECTED, {}))


def pytest_sessionfinish(session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)  # set on an xdist worker only
    if workeroutput is not None:
        workeroutput[WORKER_KEY] = session.config.stash.get(DESELECTED, {})


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist's controller: every worker collects the same tests, so one worker's counts do."""
    counts = getattr(node, "workeroutput", {}).get(WORKER_KEY)
    if counts is not None:
        node.config.stash[FROM_WORKERS] = counts


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    stats = terminalreporter.stats
    deselected = stats.get("deselected", [])
    from_workers = config.stash.get(FROM_WORKERS, {}) if not deselected else {}
    for line in summary_lines(stats.get("skipped", []), deselected, from_workers):
        terminalreporter.write_line(line)
