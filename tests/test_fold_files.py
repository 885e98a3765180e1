"""``fold_stability.json`` and the (T, T) matrices beside it in ``fold_stability.safetensors``.

Version 2 keeps the JSON small at any T (names, per-source and per-r vectors, the curve, the
matrices' sha256) and maps the cosines, their standard errors and each r's co-assignment back
read-only; a version-1 file (every array inline) still reads; a missing, cut or foreign
matrices file is one error naming it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from merit_lab.envelope import EnvelopeError
from merit_lab.io import atomic_write_json
from merit_lab.partition.folds import FOLD_STABILITY_VERSION, FoldStability


def made(t: int = 7, seed: int = 0) -> FoldStability:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(t, t))
    cos = np.clip((a + a.T) / 4, -1, 1)
    np.fill_diagonal(cos, 1.0)
    se = np.abs(rng.normal(size=(t, t))) / 10
    co = {r: rng.uniform(size=(t, t)) for r in (1, 2, 3)}
    return FoldStability(
        names=tuple(f"s{i}" for i in range(t)),
        folds=4,
        n_examples=np.arange(10, 10 + t),
        cosine=cos,
        cosine_se=(se + se.T) / 2,
        pearson_halves=np.array([0.9, np.nan, 0.8]),
        reliability=0.93,
        ari_halves={r: rng.uniform(size=3) for r in (1, 2, 3)},
        flip={r: rng.uniform(size=t) for r in (1, 2, 3)},
        coassign=co,
        sizes=np.array([5.0, 10.0, 20.0]),
        curve={r: np.sort(rng.uniform(size=3)) for r in (1, 2, 3)},
        info={"method": "balanced", "seed": 0},
    )


def assert_same(a: FoldStability, b: FoldStability) -> None:
    assert a.names == b.names and a.folds == b.folds and a.info == b.info
    for name in ("n_examples", "cosine", "cosine_se", "pearson_halves", "sizes"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.reliability == b.reliability
    for name in ("ari_halves", "flip", "coassign", "curve"):
        x, y = getattr(a, name), getattr(b, name)
        assert sorted(x) == sorted(y)
        for r in x:
            np.testing.assert_array_equal(x[r], y[r])


def test_save_puts_the_matrices_beside_a_small_json_and_load_maps_them_back(tmp_path):
    stab = made(t=40)
    path = stab.save(tmp_path / "fold_stability.json")
    doc = json.loads(path.read_text())
    assert doc["version"] == FOLD_STABILITY_VERSION == 2
    assert not {"cosine", "cosine_se", "coassign"} & set(doc)  # no (T, T) list in the JSON
    assert path.stat().st_size < 6_000  # 40 sources: the vectors only
    side = tmp_path / "fold_stability.safetensors"
    # 2 + 3 matrices of 40 × 40 float64, and the header
    assert 5 * 40 * 40 * 8 < side.stat().st_size < 5 * 40 * 40 * 8 + 2_000
    back = FoldStability.load(path)
    assert_same(back, stab)
    assert not back.cosine.flags.writeable  # mapped read-only
    assert back.summary().equals(stab.summary()) and back.describe() == stab.describe()


def test_a_version_1_file_with_every_array_inline_still_loads(tmp_path):
    stab = made()
    path = tmp_path / "fold_stability.json"
    atomic_write_json(path, stab.to_dict())
    assert json.loads(path.read_text())["version"] == 1
    assert_same(FoldStability.load(path), stab)
    assert_same(FoldStability.from_dict(stab.to_dict()), stab)


def test_a_missing_cut_or_foreign_matrices_file_is_one_error_naming_it(tmp_path):
    path = made().save(tmp_path / "fold_stability.json")
    side = tmp_path / "fold_stability.safetensors"
    kept = side.read_bytes()
    side.unlink()
    with pytest.raises(ValueError, match=r"fold_stability\.safetensors is missing.*conflict"):
        FoldStability.load(path)
    side.write_bytes(kept[:-100])
    with pytest.raises(ValueError, match=r"fold_stability\.safetensors: cut short"):
        FoldStability.load(path)
    other = made(seed=1).save(tmp_path / "other" / "fold_stability.json")
    side.write_bytes((other.parent / "fold_stability.safetensors").read_bytes())
    with pytest.raises(ValueError, match="written by another save than fold_stability.json"):
        FoldStability.load(path)
    with pytest.raises(ValueError, match="use FoldStability.load"):
        FoldStability.from_dict(json.loads(path.read_text()))
    doc = json.loads(path.read_text())
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(EnvelopeError, match="version"):
        FoldStability.load(path)
