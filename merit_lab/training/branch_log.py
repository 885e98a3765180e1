"""A branch folder's progress: ``log.jsonl`` (one line per optimizer step) and ``final/``'s
``merit_branch.json``, read without torch so that notebooks and launchers can poll them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from merit_lab.io import read_json

__all__ = ["MANIFEST", "branch_status", "read_log"]

MANIFEST = "merit_branch.json"  # in final/: what was trained; its presence marks final/ done


def read_log(path: Path) -> list[dict]:
    """A branch's ``log.jsonl``, one record per logged step; a line cut by a kill ends it."""
    out = []
    for ln in path.read_text().splitlines() if path.exists() else ():
        try:
            out.append(json.loads(ln))
        except ValueError:  # a line cut by a kill mid-write
            break
    return out


def branch_status(output_dir: str | Path) -> dict[str, Any]:
    """Where a branch stands, for a notebook to poll.

    Returns:
        ``state`` ("pending", "running" or "done"; a killed branch reads "running" until
        relaunched, see ``updated``), ``step``, ``total_steps``, ``loss`` (last logged),
        ``tokens`` and ``updated`` (unix time of the last log line, or None).
    """
    out = Path(output_dir)
    history = read_log(out / "log.jsonl")
    last = history[-1] if history else {}
    status = {
        "name": out.name,
        "state": "pending",
        "step": last.get("step", 0),
        "total_steps": last.get("total_steps"),
        "loss": last.get("loss"),
        "tokens": last.get("tokens", 0),
        "updated": last.get("time"),
    }
    if (out / "final" / MANIFEST).is_file():
        m = read_json(out / "final" / MANIFEST)
        status.update(state="done", step=m["steps"], total_steps=m["steps"], tokens=m["tokens"])
    elif history or (out / "checkpoints").is_dir():
        status["state"] = "running"
    return status
