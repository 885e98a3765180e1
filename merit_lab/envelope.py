"""The one versioned envelope every persisted object is saved in: ``{"format", "version", ...}``.

Input: a format name (``merit-lab/<thing>``), the version its writer produces, and the payload.
Output: the payload with the header on top (`wrap`, `save_enveloped`), or the checked payload
(`unwrap`, `load_enveloped`): another format or a version this code cannot read is refused with
one message naming the file, what it holds and what to do. Files written before a format carried
the header (no ``format`` key) are read as its version 1 where the caller says they may be.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from merit_lab.io import atomic_write_json, read_json

__all__ = ["EnvelopeError", "load_enveloped", "save_enveloped", "unwrap", "wrap"]

HEADER = ("format", "version")


class EnvelopeError(ValueError):
    """A persisted file of another format, or of a version this merit-lab cannot read."""


def wrap(name: str, version: int, payload: Mapping[str, Any]) -> dict[str, Any]:
    """``payload`` under the header ``{"format": name, "version": version}`` (header keys first)."""
    clash = [k for k in HEADER if k in payload]
    if clash:
        raise ValueError(f"payload of {name} uses the envelope's own keys {clash}")
    return {"format": name, "version": int(version), **payload}


def unwrap(
    data: Any,
    name: str,
    version: int,
    *,
    source: str | os.PathLike = "",
    legacy: bool = False,
) -> dict[str, Any]:
    """The payload of an enveloped document, checked to be ``name`` at a version ≤ ``version``.

    Args:
        data: the parsed document.
        name: the expected format; version: the newest version this code reads (every version
            from 1 up to it is read; a reader that changed meaning bumps it and converts).
        source: the file it came from, named in the error.
        legacy: a document without a header is version 1 (files from before the envelope).

    Raises:
        EnvelopeError: another format, a newer version, or no header where none is allowed.
    """
    where = f"{os.fspath(source)}: " if source else ""
    if not isinstance(data, Mapping):
        raise EnvelopeError(f"{where}expected a {name} document (a JSON object), got {data!r:.80}")
    if "format" not in data and legacy:
        return dict(data)
    found, v = data.get("format"), data.get("version")
    if found != name:
        raise EnvelopeError(
            f"{where}this file holds {found!r}, not {name!r}: it was written by something else, "
            "or is not the file the run expects; remove it and rerun the stage that writes it"
        )
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= version:
        raise EnvelopeError(
            f"{where}{name} version {v!r} is not one this merit-lab reads (1 to {version}): it "
            "was written by a newer merit-lab; upgrade merit-lab, or rerun the stage that "
            "writes it with this one"
        )
    return {k: val for k, val in data.items() if k not in HEADER}


def save_enveloped(
    path: str | os.PathLike, name: str, version: int, payload: Mapping[str, Any]
) -> os.PathLike:
    """Write ``payload`` under its header to ``path`` as JSON, atomically."""
    return atomic_write_json(path, wrap(name, version, payload))


def load_enveloped(
    path: str | os.PathLike, name: str, version: int, *, legacy: bool = False
) -> dict[str, Any]:
    """Read and check the JSON document at ``path`` (see `unwrap`)."""
    return unwrap(read_json(path), name, version, source=path, legacy=legacy)
