"""The controls of every merged row, built in the merge stage after the merges: is a merge more
than joint training pulled back to the same distance from θ0?

Input: the merged rows (``merged/<row>/``), the joint runs they are compared with (``final/``
and ``snapshots/step-<N>/``) and θ0. Output, under ``runs/<name>/``::

    controls/<row>_shrink/              θ0 + α(θ_joint − θ0) at the merged row's distance
    controls/<row>_early/               the joint run's first snapshot at that distance (linked)
    controls/controls.json              the distances, α and steps, and what is not reachable
    joint/<run>/snapshots/distances.json  ‖θ_step − θ0‖ of each snapshot (a cache)

A control is redone only when the merged row, the joint run or θ0 changed (their fingerprints).
A merge farther from θ0 than its joint run has no control (α > 1; no snapshot reaches it): it is
recorded as ``{"status": "not reachable", "reason": ...}`` and has no row to evaluate.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from merit_lab.config.schema import RunConfig, config_hash
from merit_lab.io import atomic_dir, atomic_write_json, read_json
from merit_lab.merging.controls import distance_to_base, early_step, shrink_alpha, write_shrink
from merit_lab.merging.stream import load_merge_manifest, save_merge_manifest
from merit_lab.models.checkpoints import fingerprint_checkpoint
from merit_lab.models.loading import resolve_model_path
from merit_lab.pipeline.rows import CONTROL_KINDS, CONTROLS, ModelRow, model_rows
from merit_lab.pipeline.rundir import RunDir, writes_run
from merit_lab.training.branch_log import MANIFEST
from merit_lab.training.snapshots import SNAPSHOT_INFO, list_snapshots

__all__ = ["CONTROLS_FILE", "DONE", "NOT_REACHABLE", "load_controls", "write_controls"]

log = logging.getLogger(__name__)

CONTROLS_FILE = "controls.json"
DISTANCES_FILE = "distances.json"  # in a joint run's snapshots/
DONE, NOT_REACHABLE = "done", "not reachable"
CONTROL_INFO = "control.json"  # an early control's record (a shrink's is its merge_manifest)


def load_controls(run_dir: str | Path) -> dict[str, Any]:
    """``controls/controls.json`` of a run (an empty record before the merge stage made it):
    ``rows`` (merged row → its distance to θ0), ``joints`` (joint run → its distance and its
    snapshots' (step, distance)), ``controls`` (control row → kind, status, α or step, ...)."""
    path = RunDir(Path(run_dir)).root / CONTROLS / CONTROLS_FILE
    return read_json(path) if path.is_file() else {"rows": {}, "joints": {}, "controls": {}}


class _Distances:
    """‖θ − θ0‖ of folders, each measured once per weights: ``cache`` maps a folder (relative to
    ``root``, so the cache moves with the run) to the key of the weights it was measured on
    (their fingerprint, or a cheaper key) and the distance."""

    def __init__(self, base: Path, base_fp: str, cache: dict[str, Any], root: Path) -> None:
        self.base, self.base_fp, self.root = base, base_fp, root
        same = cache.get("base_fingerprint") == base_fp
        self.cache = {"base_fingerprint": base_fp, "folders": dict(cache.get("folders", {}))}
        if not same:
            self.cache["folders"] = {}
        self._fingerprints: dict[Path, str] = {}  # each folder hashed once per stage

    def of(self, folder: Path, key: str | None = None) -> tuple[float, str]:
        """(distance, the key it was measured under: the weights' fingerprint by default)."""
        if key is None:
            if folder not in self._fingerprints:
                self._fingerprints[folder] = fingerprint_checkpoint(folder)
            key = self._fingerprints[folder]
        name = _rel(folder, self.root)
        seen = self.cache["folders"].get(name)
        if seen is None or seen["key"] != key:
            seen = {"key": key, "distance": distance_to_base(folder, self.base)}
            self.cache["folders"][name] = seen
        return float(seen["distance"]), key


def _snapshot_distances(joint: Path, final_distance: float, measure: _Distances) -> list:
    """[step, distance] of θ0 (step 0), each complete snapshot and ``final/`` (its last step,
    when no snapshot is at it), cached in ``snapshots/distances.json`` by each snapshot's
    ``snapshot.json`` and weight file sizes (a snapshot is written once, never rewritten)."""
    path = joint / "snapshots" / DISTANCES_FILE
    old = read_json(path) if path.is_file() else {}
    local = _Distances(measure.base, measure.base_fp, old, path.parent)
    out = [[0, 0.0]]
    for step, folder in list_snapshots(joint):
        sizes = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors"))
        key = config_hash(read_json(folder / SNAPSHOT_INFO), sizes)
        out.append([step, local.of(folder, key)[0]])
    if len(out) > 1 and local.cache != old:
        atomic_write_json(path, local.cache)
    last = int(read_json(joint / "final" / MANIFEST)["steps"])
    if last > out[-1][0]:
        out.append([last, final_distance])
    return out


def _link_folder(src: Path, out: Path) -> None:
    """``out`` as a copy of the HF folder ``src`` (hard links where the file system allows),
    without its run records (``merit_branch.json``, ``snapshot.json``) or sub-folders."""
    with atomic_dir(out, overwrite=True) as tmp:
        for p in sorted(src.iterdir()):
            if not p.is_file() or p.name in (MANIFEST, SNAPSHOT_INFO):
                continue
            try:
                os.link(p, tmp / p.name)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(p, tmp / p.name)


def _current(entry: dict | None, key: str, folder: Path, kind: str) -> bool:
    """Whether a recorded control was made from these inputs and its folder is still its own."""
    if not entry or entry.get("key") != key:
        return False
    if entry["status"] != DONE:
        return not folder.exists()
    if kind == "shrink":
        has = (folder / "merge_manifest.json").is_file()
        return has and load_merge_manifest(folder).get("merit_key") == key
    has = (folder / CONTROL_INFO).is_file()
    return has and read_json(folder / CONTROL_INFO).get("key") == key


def _shrink(
    cfg: RunConfig, row: ModelRow, base: Path, target: float, joint_d: float, root: Path
) -> dict:
    try:
        alpha = shrink_alpha(joint_d, target)
    except ValueError as e:
        return {"status": NOT_REACHABLE, "reason": str(e)}
    write_shrink(
        base,
        row.joint / "final",
        alpha,
        row.model_dir,
        target_distance=target,
        shard_size=cfg.merge.shard_size,
        overwrite=True,
        relative_root=root,  # the joint run: relative, so the record moves with the run
    )
    measured = load_merge_manifest(row.model_dir)["control"]["distance_to_base"]
    return {"status": DONE, "alpha": alpha, "distance_to_base": measured}


def _early(row: ModelRow, target: float, snapshots: list, root: Path) -> dict:
    try:
        step = early_step([(int(a), float(b)) for a, b in snapshots], target)
    except ValueError as e:
        return {"status": NOT_REACHABLE, "reason": str(e)}
    if step is None:
        last, dist = snapshots[-1]
        return {
            "status": NOT_REACHABLE,
            "reason": f"no snapshot of {row.joint.name} reaches distance {target:.6g} from θ0: "
            f"the run ends at {dist:.6g} (step {last}), closer to θ0 than the merge",
        }
    src = dict(list_snapshots(row.joint)).get(step, row.joint / "final")  # last step: final/
    _link_folder(src, row.model_dir)
    distance = dict((int(a), float(b)) for a, b in snapshots)[step]
    return {"status": DONE, "step": step, "distance_to_base": distance, "from": _rel(src, root)}


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _make(cfg: RunConfig, row: ModelRow, key: str, facts: dict, snaps: list, run: RunDir) -> dict:
    """Build one control (or find it not reachable) and record it in its folder."""
    base = Path(resolve_model_path(cfg.model))
    if row.kind == "shrink":
        target, joint_d = facts["target_distance"], facts["joint_distance"]
        result = _shrink(cfg, row, base, target, joint_d, run.root)
    else:
        result = _early(row, facts["target_distance"], snaps, run.root)
    if result["status"] != DONE:
        shutil.rmtree(row.model_dir, ignore_errors=True)  # an older control is not this one
        log.info("%s: %s", row.label, result["reason"])
    elif row.kind == "shrink":
        manifest = load_merge_manifest(row.model_dir)
        save_merge_manifest(row.model_dir, {**manifest, "merit_key": key})
    else:
        atomic_write_json(row.model_dir / CONTROL_INFO, {**result, "key": key})
    return {**facts, **result, "key": key}


@writes_run
def write_controls(cfg: RunConfig) -> list[dict]:
    """Measure every merged row's distance to θ0 and build its controls (see the module
    docstring); a control made from the same inputs is kept.

    Returns:
        Per control row: label, kind, status, seconds (0 when kept).

    Raises:
        FileNotFoundError: a merged row or joint run is missing (run the train/merge stages).
    """
    rows = [r for r in model_rows(cfg, controls=True) if r.kind in CONTROL_KINDS]
    run = RunDir(Path(cfg.run_dir))
    folder = run.root / CONTROLS
    if not rows:
        shutil.rmtree(folder, ignore_errors=True)
        return []
    base = Path(resolve_model_path(cfg.model))
    old = load_controls(run.root)
    measure = _Distances(base, fingerprint_checkpoint(base), old.get("cache", {}), run.root)
    record: dict[str, Any] = {"rows": {}, "joints": {}, "controls": {}}
    done, snapshots = [], {}
    for row in rows:
        merged, joint = run.merged_dir(row.controls), row.joint
        for p, what in ((merged, "merged row"), (joint / "final" / MANIFEST, "joint run")):
            if not p.exists():
                raise FileNotFoundError(f"{row.label}: the {what} {p} is missing; run train/merge")
        target, merged_fp = measure.of(merged)
        joint_d, joint_fp = measure.of(joint / "final")
        if joint not in snapshots:
            snapshots[joint] = _snapshot_distances(joint, joint_d, measure)
            _warn_missing_snapshots(cfg, joint, snapshots[joint])
        snaps, rel = snapshots[joint], _rel(joint, run.root)
        record["rows"][row.controls] = {"distance_to_base": target}
        record["joints"][rel] = {"distance_to_base": joint_d, "snapshots": snaps}
        extra = cfg.merge.shard_size if row.kind == "shrink" else snaps
        key = config_hash(row.kind, merged_fp, joint_fp, measure.base_fp, extra)
        entry, t0 = old["controls"].get(row.label), time.perf_counter()
        if not _current(entry, key, row.model_dir, row.kind):
            facts = {
                "kind": row.kind,
                "experiment": row.experiment,
                "controls": row.controls,
                "joint": rel,
                "target_distance": target,
                "joint_distance": joint_d,
            }
            entry = _make(cfg, row, key, facts, snaps, run)
            seconds = time.perf_counter() - t0
        else:
            seconds = 0.0
        record["controls"][row.label] = entry
        done.append(
            {"label": row.label, "kind": row.kind, "status": entry["status"], "seconds": seconds}
        )
    record["cache"] = measure.cache
    kept = {r.model_dir for r in rows}
    for p in folder.iterdir() if folder.is_dir() else ():
        if p.is_dir() and p not in kept:  # a control of a row no longer in the config
            shutil.rmtree(p)
    atomic_write_json(folder / CONTROLS_FILE, record)
    return done


def _warn_missing_snapshots(cfg: RunConfig, joint: Path, snaps: list) -> None:
    last, have = snaps[-1][0], {int(s) for s, _ in snaps}
    missing = [s for s in cfg.train.snapshot_steps if s <= last and s not in have]
    if missing:
        log.warning(
            "%s has no snapshots at steps %s (trained before train.snapshot_steps named them?): "
            "its early controls and joint path use the steps it has; delete the folder and run "
            "train again to keep them",
            joint,
            missing,
        )
