"""Content digests of a merge's files, each recording the algorithm that made it.

Input: files (weights, configs) and digest strings from ``merge_manifest.json``. Output: new
digests, ``"xxh3_128:<32 hex>"`` by default, and checks of files against recorded ones. A bare
64-hex digest is sha256 (the only kind manifests held before) and is still checked with sha256.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import xxhash

__all__ = [
    "DEFAULT_DIGEST",
    "DIGESTS",
    "digest_algorithm",
    "file_digest",
    "format_digest",
    "new_hasher",
    "verify_digest",
    "verify_merge_files",
]

# algorithm name -> hasher factory (update(buffer), hexdigest()); hashlib and xxhash release the
# GIL on big buffers, so the merge hashes beside its other threads
DIGESTS: Mapping[str, Callable[[], Any]] = {
    "sha256": hashlib.sha256,
    "xxh3_128": xxhash.xxh3_128,
}
# 128-bit xxh3 reads at ~8 GiB/s a core here against sha256's 0.7 (benchmarks/bench_merge.py):
# on the merge's path sha256 cost more than reading and writing the bytes did. It detects any
# accidental change; it is no defence against a crafted collision (pass digest="sha256" for that).
DEFAULT_DIGEST = "xxh3_128"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_TAGGED = re.compile(r"([a-z0-9_]+):([0-9a-f]+)")


def new_hasher(algorithm: str) -> Any:
    """A fresh hasher of ``algorithm`` (a key of `DIGESTS`)."""
    if algorithm not in DIGESTS:
        raise ValueError(f"unknown digest {algorithm!r}; known: {sorted(DIGESTS)}")
    return DIGESTS[algorithm]()


def format_digest(algorithm: str, hexdigest: str) -> str:
    """How a manifest records a digest: sha256 as bare hex (the format of every manifest written
    before digests were tagged, and of `merit_lab.io.sha256_file`), others as ``"name:hex"``."""
    return hexdigest if algorithm == "sha256" else f"{algorithm}:{hexdigest}"


def digest_algorithm(digest: str) -> str:
    """The algorithm a recorded digest was made with; ValueError for a string that is neither a
    tagged digest of a known algorithm nor 64 hex digits (sha256)."""
    if _SHA256_HEX.fullmatch(digest):
        return "sha256"
    m = _TAGGED.fullmatch(digest)
    if m is None or m.group(1) not in DIGESTS or m.group(1) == "sha256":
        raise ValueError(
            f"{digest[:80]!r} is not a file digest: expected 64 hex digits (sha256) or "
            f"'<algorithm>:<hex>' with an algorithm of {sorted(DIGESTS)}"
        )
    return m.group(1)


def file_digest(path: str | Path, algorithm: str = DEFAULT_DIGEST, chunk: int = 1 << 22) -> str:
    """The digest of a file's bytes, formatted as `format_digest` records it."""
    h, buf = new_hasher(algorithm), bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return format_digest(algorithm, h.hexdigest())


def verify_digest(path: str | Path, digest: str) -> bool:
    """Whether the file's bytes still have ``digest``, recomputed with the algorithm it names."""
    return file_digest(path, digest_algorithm(digest)) == digest


def verify_merge_files(folder: str | Path, manifest: Mapping[str, Any]) -> list[str]:
    """The output files of a merged ``folder`` that are missing or changed since its manifest
    (``load_merge_manifest``) recorded them; an empty list when every one is as recorded."""
    folder = Path(folder)
    return [
        name
        for name, digest in manifest["output"]["files"].items()
        if not (folder / name).is_file() or not verify_digest(folder / name, digest)
    ]
