"""Conflict drift: principal angles against hand-worked cases, and `merit-lab drift` end to end
on a tiny trained run of the demo base."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from merit_lab.analysis.drift import Drift, compute_drift, pca_basis, principal_angles
from merit_lab.config.schema import load_config
from merit_lab.envelope import EnvelopeError
from merit_lab.pipeline import run_pipeline
from merit_lab.pipeline.drift import compute_run_drift, drift_section, load_drift
from tests.conftest import write_demo_slice, write_tiny_run_config


def test_principal_angles_hand_worked():
    """span(e1, e2) against span(e1, cos 30° e2 + sin 30° e3): angles 0° and 30°; against
    span(e3): 90°. Bases need not be orthonormal (scipy orthonormalises them)."""
    e = np.eye(3)
    a = np.column_stack([e[0], e[1]])
    b = np.column_stack([2 * e[0] + e[1], np.cos(np.pi / 6) * e[1] + np.sin(np.pi / 6) * e[2]])
    b_ortho = np.column_stack([e[0], np.cos(np.pi / 6) * e[1] + np.sin(np.pi / 6) * e[2]])
    np.testing.assert_allclose(principal_angles(a, b_ortho), [0.0, 30.0], atol=1e-10)
    # span(2e1 + e2, .866 e2 + .5 e3) ∩ span(e1, e2) is one line: one angle 0, the other
    # the angle between the planes' normals e3 and n_b ∝ (e1 − 2e2)×... computed by hand:
    n_b = np.cross(b[:, 0], b[:, 1])
    between = np.degrees(np.arccos(abs(n_b[2]) / np.linalg.norm(n_b)))
    np.testing.assert_allclose(principal_angles(a, b), [0.0, between], atol=1e-10)
    np.testing.assert_allclose(principal_angles(a, e[:, [2]]), [90.0], atol=1e-10)


def test_pca_basis_and_drift_of_a_known_rotation():
    """Four sources in R^4 whose unit rows differ along e1 (±) and e2 (±, smaller): θ0's PCA
    plane is span(e1, e2). Rotating the e2 part into e3 by 40° turns the plane by 40° (angles 0°
    and 40°) and leaves each source's cosine to itself at θ0 as computed by hand."""
    rows0 = np.array([[2, 1, 0, 5], [2, -1, 0, 5], [-2, 1, 0, 5], [-2, -1, 0, 5]], float)
    basis = pca_basis(rows0, 2)
    np.testing.assert_allclose(np.abs(basis.T @ np.eye(4)[:, :2]), np.eye(2), atol=1e-12)
    c, s = np.cos(np.radians(40)), np.sin(np.radians(40))
    rows1 = rows0.copy()
    rows1[:, 1], rows1[:, 2] = c * rows0[:, 1], s * rows0[:, 1]
    drift = compute_drift([f"s{i}" for i in range(4)], rows0, {"later": rows1}, k=2)
    (p,) = drift.points
    np.testing.assert_allclose(p.angles, [0.0, 40.0], atol=1e-9)
    own = (rows0 * rows1).sum(1) / (np.linalg.norm(rows0, axis=1) * np.linalg.norm(rows1, axis=1))
    np.testing.assert_allclose(p.cos_to_theta0, own, atol=1e-12)
    np.testing.assert_allclose(p.cos_to_theta0, (4 + c + 25) / 30, atol=1e-12)
    same = compute_drift([f"s{i}" for i in range(4)], rows0, {"same": 3 * rows0}, k=2).points[0]
    np.testing.assert_allclose(same.angles, 0.0, atol=1e-6)
    np.testing.assert_allclose(same.displacement, 0.0, atol=1e-12)
    np.testing.assert_allclose(same.coords, drift.theta0.coords(2), atol=1e-12)
    with pytest.raises(ValueError, match="k must be"):
        compute_drift(["a", "b", "c"], rows0[:3], {}, k=2)


def test_drift_document_is_enveloped_and_a_legacy_one_still_loads():
    """`Drift.to_dict` carries the header; a newer version or another format is refused naming
    the file; a document from before the envelope (no header) reads as version 1."""
    rows0 = np.array([[2, 1, 0, 5], [2, -1, 0, 5], [-2, 1, 0, 5], [-2, -1, 0, 5]], float)
    rows1 = rows0 + np.array([0.0, 0.0, 1.0, 0.0])
    drift = compute_drift([f"s{i}" for i in range(4)], rows0, {"later": rows1}, k=2)
    doc = json.loads(json.dumps(drift.to_dict()))  # as drift.json holds it
    assert list(doc)[:2] == ["format", "version"]
    assert (doc["format"], doc["version"]) == ("merit-lab/drift", 1)
    for legacy in (False, True):
        d = {k: v for k, v in doc.items() if k not in ("format", "version")} if legacy else doc
        back = Drift.from_dict(d, drift.theta0)
        assert back.names == drift.names and back.k == 2
        np.testing.assert_array_equal(back.points[0].angles, drift.points[0].angles)
        np.testing.assert_array_equal(back.points[0].coords, drift.points[0].coords)
    with pytest.raises(EnvelopeError, match="drift.json: merit-lab/drift version 2 is not one"):
        Drift.from_dict({**doc, "version": 2}, drift.theta0, source="drift.json")
    with pytest.raises(EnvelopeError, match="holds 'merit-lab/conflict', not 'merit-lab/drift'"):
        Drift.from_dict({**doc, "format": "merit-lab/conflict"}, drift.theta0)


SOURCES = [
    "reverse-a-terse-lower",
    "reverse-a-terse-upper",
    "reverse-a-verbose-lower",
    "reverse-a-verbose-upper",
]


def test_drift_end_to_end_on_a_tiny_run(tmp_path: Path, one_thread):
    """Train a tiny run (joint-1ep and a 2-branch split of 4 demo sources), then compute the
    drift: the middle is trained again to the logged losses, and every checkpoint has a point."""
    data = write_demo_slice(tmp_path / "data", SOURCES, {"train": 8, "calibration": 8, "eval": 2})
    path = write_tiny_run_config(
        tmp_path / "cfg.yaml",
        data,
        tmp_path / "runs",
        model="demo",
        train={"batch_size": 4, "lr": 3e-3, "save_steps": 50},
    )
    run = run_pipeline(load_config(path), until="train")
    with pytest.raises(ValueError, match="n must be"):
        compute_run_drift(run.root, n=99)
    out = compute_run_drift(run.root, n=4, k=2)
    data = json.loads(out.read_text())
    assert data["midpoint"]["step"] == 4 and data["midpoint"]["total_steps"] == 8
    # the same steps as the joint run, exactly (the guide: "matched the run's logged losses
    # exactly"): the same process, thread count and seed retrace the run bit for bit
    assert data["midpoint"]["max_abs_loss_diff"] == 0.0
    assert data["midpoint"]["steps_compared"] == 3  # logged before it stops at step 4's end
    drift = load_drift(run.root)
    assert [p.label for p in drift.points] == [
        "joint-1ep/mid",
        "joint-1ep/end",
        "merit-1d/0",
        "merit-1d/1",
    ]
    for p in drift.points:
        assert p.angles.shape == (2,) and np.all((p.angles >= 0) & (p.angles <= 90))
        assert p.cos_to_theta0.shape == (4,) and np.all(p.cos_to_theta0 <= 1 + 1e-9)
    mid, end = drift.points[0], drift.points[1]
    assert np.all(mid.cos_to_theta0 < 0.999) and np.all(end.cos_to_theta0 < 0.999)  # it moved
    assert not np.allclose(mid.coords, end.coords)
    assert (run.drift / "joint-mid" / "model.safetensors").is_file()
    assert not (run.drift / "joint-mid-training").exists()
    assert "## Conflict drift" in drift_section(run.root)
