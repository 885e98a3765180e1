"""What a clean clone holds: the pointers in README and docs are checked against this, never
against whatever a test or a run left on disk (tests/artifacts/, runs/, .bench/, a fetched
corpus)."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@cache
def tracked() -> frozenset[str]:
    """Git's tracked files, plus new files git would add, minus those deleted from the tree."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: pointers are checked against git's file list")

    def ls(*flags: str) -> set[str]:
        out = subprocess.run(
            ["git", "ls-files", "-z", *flags], cwd=ROOT, capture_output=True, check=True
        ).stdout
        return {p for p in out.decode().split("\0") if p}

    return frozenset((ls("--cached") | ls("--others", "--exclude-standard")) - ls("--deleted"))


def is_tracked(path: str) -> bool:
    """A file a clean clone has, or a folder holding one."""
    path = path.rstrip("/")
    return path in tracked() or any(p.startswith(path + "/") for p in tracked())
