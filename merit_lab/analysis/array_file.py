"""Large float64 arrays in a safetensors file: streamed in atomically, memory-mapped back.

Input: named C-ordered float64 arrays (numpy, a `np.memmap` too) and string metadata. Output:
a ``.safetensors`` file any safetensors reader opens, written a block of rows at a time through
`merit_lab.io.atomic_write_chunks` (no second copy of an array in memory), and its arrays mapped
read-only (`map_arrays`: nothing is read but the header until the pages are used).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from merit_lab.envelope import load_enveloped, save_enveloped
from merit_lab.io import atomic_write_chunks

__all__ = [
    "arrays_digest",
    "load_beside",
    "map_arrays",
    "save_arrays",
    "save_beside",
]

# Rows of an array written (and hashed) at a time: at most this many bytes.
_BLOCK_BYTES = 2**26


def _blocks(arr: np.ndarray) -> Iterator[np.ndarray]:
    """C-ordered little-endian float64 row blocks of ``arr`` (views where it already is one)."""
    step = max(1, _BLOCK_BYTES // max(1, arr[:1].nbytes))
    for lo in range(0, max(1, arr.shape[0]), step):
        yield np.ascontiguousarray(arr[lo : lo + step], dtype="<f8")


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the names, shapes and float64 bytes of ``arrays``, a block at a time."""
    h = hashlib.sha256()
    for name, arr in arrays.items():
        h.update(json.dumps([name, list(arr.shape)]).encode())
        for block in _blocks(arr):
            h.update(memoryview(block).cast("B"))
    return h.hexdigest()


def save_arrays(
    path: str | os.PathLike, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> Path:
    """Write ``arrays`` as float64 tensors (in this order) with ``metadata`` to ``path``."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    at = 0
    for name, arr in arrays.items():
        size = 8 * math.prod(arr.shape)
        header[name] = {"dtype": "F64", "shape": list(arr.shape), "data_offsets": [at, at + size]}
        at += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads it

    def chunks() -> Iterator[bytes | memoryview]:
        yield len(text).to_bytes(8, "little") + text
        for arr in arrays.values():
            for block in _blocks(arr):
                yield memoryview(block).cast("B")

    return atomic_write_chunks(path, chunks())


def map_arrays(
    path: str | os.PathLike, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The float64 arrays ``shapes`` names, mapped read-only from ``path``, and its metadata.

    Raises:
        ValueError: naming ``path``: missing, not a safetensors file, cut short, or an array
            absent or of another dtype or shape than expected.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= path.stat().st_size - 8:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(f.read(size))
        file_size = path.stat().st_size
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeError are ValueErrors
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    out = {}
    for name, shape in shapes.items():
        spec = header.get(name)
        if not isinstance(spec, dict) or spec.get("dtype") != "F64":
            raise ValueError(f"{path}: no float64 array {name!r} ({spec})")
        lo, hi = spec["data_offsets"]
        if tuple(spec["shape"]) != tuple(shape) or hi - lo != 8 * math.prod(shape):
            raise ValueError(f"{path}: {name!r} has shape {spec['shape']}, expected {list(shape)}")
        if 8 + size + hi > file_size:
            raise ValueError(
                f"{path}: cut short ({file_size} bytes; {name!r} ends at byte {8 + size + hi})"
            )
        mapped = np.memmap(path, "<f8", "r", offset=8 + size + lo, shape=tuple(shape))
        out[name] = np.asarray(mapped)  # a plain read-only ndarray over the map
    return out, dict(header.get("__metadata__") or {})


def save_beside(
    path: str | os.PathLike,
    name: str,
    version: int,
    payload: Mapping[str, object],
    arrays: Mapping[str, np.ndarray],
) -> Path:
    """An enveloped JSON document (``path``) whose large ``arrays`` live in ``<stem>.safetensors``
    beside it: the arrays first, then the JSON with their file name, shapes and sha256 (written
    last, it marks the pair saved); both atomically. `load_beside` reads it back."""
    path = Path(path)
    digest = arrays_digest(arrays)
    file = path.with_suffix(".safetensors")
    save_arrays(file, arrays, {"format": f"{name}-arrays", "sha256": digest})
    shapes = {k: list(a.shape) for k, a in arrays.items()}
    spec = {"file": file.name, "sha256": digest, "shapes": shapes}
    return save_enveloped(path, name, version, {**payload, "arrays": spec})


def load_beside(
    path: str | os.PathLike, name: str, version: int, redo: str
) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """`save_beside`'s payload and its arrays, mapped read-only. A missing, cut or foreign
    arrays file, or one another save wrote, is one ValueError naming it and saying ``redo``;
    another format or a newer version: `merit_lab.envelope.EnvelopeError`."""
    path = Path(path)
    d = load_enveloped(path, name, version)
    try:
        spec = d["arrays"]
        file = path.parent / spec["file"]
        shapes = {k: tuple(int(x) for x in v) for k, v in spec["shapes"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: no readable 'arrays' entry ({e!r}); {redo}") from None
    try:
        arrays, meta = map_arrays(file, shapes)
    except ValueError as e:
        raise ValueError(f"{e}; {redo}") from None
    if meta.get("sha256") != spec.get("sha256"):
        raise ValueError(f"{file} was written by another save than {path.name}; {redo}")
    return d, arrays
