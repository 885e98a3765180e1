"""The controls in the pipeline: joint snapshots, shrink and early rows beside every merge,
evaluation-only sources, and the frontier in results.json and the report.

One tiny run on a pico Llama (4 arithmetic sources; joint-1ep with snapshots, a short joint
run too close to θ0 for any control, MERIT-1D, the shrink and early controls of each joint,
two evaluation-only chat sources); every number is checked against the weights on disk.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from merit_lab.config.schema import load_config
from merit_lab.evaluation.evaluate import summarize_eval
from merit_lab.io import read_json
from merit_lab.merging.controls import early_step
from merit_lab.pipeline import run_pipeline
from merit_lab.pipeline.controls import load_controls, write_controls
from merit_lab.pipeline.rows import CONTROL_KINDS, ROW_KINDS, seed_variants
from tests.conftest import chat, write_jsonl, write_pico_branch_assets

OPS = {"add": lambda a, b: a + b, "max": max, "min": min, "sub": lambda a, b: a - b}
HELDOUT = ("chat-a", "chat-b")
SNAPSHOT_STEPS = [2, 4, 6, 100]  # 100: past the run's end, never written
EXPERIMENTS = [
    {"name": "joint-1ep", "kind": "joint", "epochs": 1},
    {"name": "joint-q", "kind": "joint", "epochs": 0.25},  # 2 steps: nearer θ0 than any merge
    {"name": "merit-1d", "merges": ["linear"]},
    {"name": "shrink", "kind": "shrink"},
    {"name": "early", "kind": "early"},
    {"name": "shrink-q", "kind": "shrink", "joint": "joint-q"},
    {"name": "early-q", "kind": "early", "joint": "joint-q"},
]


def _write_heldout(folder: Path) -> Path:
    words = ["cat", "dog", "sun", "tree"]
    write_jsonl(
        folder / "chat-a.jsonl",
        [chat(f"tell me about {w}", f"{w} is a word with {len(w)} letters.") for w in words],
    )
    write_jsonl(folder / "chat-b.jsonl", [chat(f"describe {w}", f"{w} is short.") for w in words])
    families = {"sources": {s: {"family": "chat"} for s in HELDOUT}}
    (folder / "sources.json").write_text(json.dumps(families))
    return folder


def _config(root: Path, base: Path, mix: Path, held: Path, **over) -> Path:
    cfg = {
        "name": "ctl",
        "model": str(base),
        "mixture": str(mix),
        "output_dir": str(root / "runs"),
        "device": "cpu",
        "calibration": {"n": 4, "micro_batch_size": 4},
        "sketch": {"kind": "countsketch", "dim": 1024},
        "partition": {"method": "balanced", "r": 1},
        "train": {
            "batch_size": 8,
            "lr": 1e-2,
            "save_steps": 50,
            "seeds": [1],
            "snapshot_steps": SNAPSHOT_STEPS,
        },
        "experiments": EXPERIMENTS,
        "eval": {"max_examples": 2, "max_new_tokens": 4, "heldout": str(held)},
        **over,
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    root = tmp_path_factory.mktemp("ctl")
    base, mix = write_pico_branch_assets(root, n=20, ops=OPS)
    return root, base, mix, _write_heldout(root / "held")


@pytest.fixture(scope="module")
def ctl_run(assets):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(_config(*assets))
        stages = ["mixture", "gradients", "conflict", "partition", "train", "merge", "evaluate"]
        run = run_pipeline(cfg, [*stages, "report"])
    finally:
        torch.set_num_threads(threads)
    return cfg, run, assets[1]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(f)
    return out


def _distance(a: Path, b: Path) -> float:
    """‖θ_a − θ_b‖ over every tensor, in float64 (independent of `distance_to_base`)."""
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb)
    return math.sqrt(sum(float(((wa[k].double() - wb[k].double()) ** 2).sum()) for k in wa))


def _log(joint: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (joint / "log.jsonl").read_text().splitlines())}


def test_joint_runs_keep_snapshots_at_their_steps_and_branches_none(ctl_run):
    _, run, base = ctl_run
    joint = run.root / "joint" / "ep1-s0"
    log = _log(joint)
    last = read_json(joint / "final" / "merit_branch.json")["steps"]
    assert last == max(log) > 6  # step 100 is past the end
    steps = sorted(int(p.name.split("-")[1]) for p in (joint / "snapshots").glob("step-*"))
    assert steps == [2, 4, 6]
    for step in steps:
        folder = joint / "snapshots" / f"step-{step}"
        info = read_json(folder / "snapshot.json")
        assert info["step"] == step and info["tokens"] == log[step]["tokens"]
        assert info["epoch"] == pytest.approx(log[step]["epoch"])
        w, w0 = _weights(folder), _weights(base)
        assert {k: (v.dtype, v.shape) for k, v in w.items()} == {
            k: (v.dtype, v.shape) for k, v in w0.items()
        }
        assert read_json(folder / "config.json")["dtype"] == "float32"
    # the distance grows along the run, and the last snapshot is not the final model
    assert 0 < _distance(joint / "snapshots/step-2", base) < _distance(joint / "final", base)
    assert _distance(joint / "snapshots/step-6", joint / "final") > 0
    short = run.root / "joint" / "ep0.25-s0"
    assert [p.name for p in (short / "snapshots").glob("step-*")] == ["step-2"]
    for spec in run.root.glob("branches/*/*/spec.json"):
        assert "snapshot_steps" not in read_json(spec), spec  # the old layout: not written
        assert not (spec.parent / "snapshots").exists()
    assert read_json(joint / "spec.json")["snapshot_steps"] == SNAPSHOT_STEPS


def test_shrink_controls_sit_at_their_merge_s_distance_with_alpha_by_hand(ctl_run):
    _, run, base = ctl_run
    merged, joint = run.root / "merged" / "merit-1d", run.root / "joint" / "ep1-s0"
    d_merge, d_joint = _distance(merged, base), _distance(joint / "final", base)
    alpha = d_merge / d_joint  # the hand computation
    entry = load_controls(run.root)["controls"]["merit-1d:shrink"]
    assert entry["status"] == "done" and entry["alpha"] == pytest.approx(alpha, rel=1e-9)
    folder = run.root / "controls" / "merit-1d_shrink"
    assert abs(_distance(folder, base) - d_merge) < 1e-6
    w, w0, wj = _weights(folder), _weights(base), _weights(joint / "final")
    for k in w0:
        want = w0[k].double() + alpha * (wj[k].double() - w0[k].double())
        torch.testing.assert_close(w[k].double(), want, atol=1e-6, rtol=0)
    record = load_controls(run.root)
    assert record["rows"]["merit-1d"]["distance_to_base"] == pytest.approx(d_merge, abs=1e-6)
    assert record["joints"]["joint/ep1-s0"]["distance_to_base"] == pytest.approx(d_joint, abs=1e-6)


def test_early_controls_take_the_first_snapshot_that_reaches_the_distance(ctl_run):
    _, run, base = ctl_run
    joint = run.root / "joint" / "ep1-s0"
    record = load_controls(run.root)
    recorded = [(int(s), float(d)) for s, d in record["joints"]["joint/ep1-s0"]["snapshots"]]
    last = read_json(joint / "final" / "merit_branch.json")["steps"]
    assert [s for s, _ in recorded] == [0, 2, 4, 6, last]  # θ0, the snapshots, final/
    for step, d in recorded[1:-1]:
        assert d == pytest.approx(_distance(joint / f"snapshots/step-{step}", base), abs=1e-6)
    assert recorded[-1][1] == pytest.approx(_distance(joint / "final", base), abs=1e-6)
    entry = record["controls"]["merit-1d:early"]
    target = record["rows"]["merit-1d"]["distance_to_base"]
    step = early_step(recorded, target)
    assert entry["status"] == "done" and entry["step"] == step
    assert entry["distance_to_base"] == dict(recorded)[step] >= target
    assert all(d < target for s, d in recorded if s < step)  # the first that reaches it
    src = joint / f"snapshots/step-{step}" if step != last else joint / "final"
    folder = run.root / "controls" / "merit-1d_early"
    for f in src.glob("*.safetensors"):
        assert (folder / f.name).read_bytes() == f.read_bytes()
    assert (
        not (folder / "snapshot.json").exists()
        and read_json(folder / "control.json")["step"] == step
    )


def test_controls_no_joint_checkpoint_matches_are_recorded_and_not_evaluated(ctl_run):
    _, run, _ = ctl_run
    record = load_controls(run.root)
    table = pd.read_parquet(run.eval)
    for label, entry in record["controls"].items():
        target, joint = entry["target_distance"], record["joints"][entry["joint"]]
        reachable = (
            target <= joint["distance_to_base"]
            if entry["kind"] == "shrink"
            else any(d >= target for _, d in joint["snapshots"])
        )
        assert (entry["status"] == "done") == reachable, label
        assert (label in set(table["model"])) == reachable, label
        folder = run.root / "controls" / label.replace(":", "_")
        assert folder.is_dir() == reachable, label
    for label in ("merit-1d:shrink-q", "merit-1d:early-q"):  # joint-q ends nearer θ0
        assert record["controls"][label]["status"] == "not reachable"
        assert "θ0" in record["controls"][label]["reason"]
    assert "not reachable" in run.report.read_text()


def test_no_control_or_heldout_source_is_trained_and_every_row_is_scored_on_them(ctl_run):
    _, run, _ = ctl_run
    trained = {s["name"] for s in read_json(run.mixture)["sources"]}
    assert trained == set(OPS) and not trained & set(HELDOUT)
    specs = list(run.root.rglob("spec.json"))
    assert len(specs) == 8  # joint-1ep, joint-q and MERIT-1D's two branches, 2 seeds; no control
    for path in specs:
        text = path.read_text()
        assert set(read_json(path)["sources"]) <= trained
        assert not any(name in text for name in HELDOUT), path
        assert "controls" not in path.parts
    for path in (run.bank_json, run.partition, *run.root.glob("branches/*/partition.json")):
        assert not any(name in path.read_text() for name in HELDOUT), path
    table = pd.read_parquet(run.eval)
    held = table[table["split"] == "heldout"]
    assert set(held["source"]) == set(HELDOUT) and set(held["family"]) == {"chat"}
    assert set(held["model"]) == set(table["model"])  # θ0, the rows, controls and snapshots
    assert {"theta0", "merit-1d:shrink", "merit-1d:early", "joint-1ep:step4"} <= set(held["model"])
    assert not (table[table["split"] == "eval"]["source"].isin(HELDOUT)).any()


def test_results_and_report_put_each_merge_beside_its_controls(ctl_run):
    _, run, _ = ctl_run
    results, record = read_json(run.results), load_controls(run.root)
    table = pd.read_parquet(run.eval)
    ctl = results["controls"]["merit-1d"]
    assert ctl["distance_to_base"] == record["rows"]["merit-1d"]["distance_to_base"]
    assert ctl["shrink"]["alpha"] == record["controls"]["merit-1d:shrink"]["alpha"]
    assert ctl["early"]["step"] == record["controls"]["merit-1d:early"]["step"]
    assert ctl["shrink-q"]["status"] == "not reachable"
    front = results["frontier"]
    assert front["y"] == {"metric": "in_style", "split": "heldout", "higher_is_better": True}
    loss = summarize_eval(table, metric="loss")["avg"]
    style = summarize_eval(table, metric="in_style", split="heldout")["avg"]
    for label in ("theta0", "joint-1ep", "merit-1d", "merit-1d:shrink", "merit-1d:early"):
        p, seeds = front["points"][label], [m for m in (label, f"{label}@s1") if m in loss]
        assert len(seeds) == (1 if label == "theta0" else 2)  # points: means over the seeds
        assert p["x"] == pytest.approx(loss[seeds].mean()) and p["y"] == style[seeds].mean()
        assert p["x_err"] == pytest.approx(loss[seeds].std(ddof=1) if len(seeds) > 1 else 0)
        assert p["position"] in ("above", "on", "below", "outside")
    assert front["points"]["merit-1d"]["kind"] == "merge"
    assert "joint-1ep:step4" not in front["points"]  # snapshots are the path, not points
    joint_path = front["paths"]["joint-1ep"]
    assert [v["label"] for v in joint_path["vertices"]][:4] == [
        "theta0",
        "joint-1ep:step2",
        "joint-1ep:step4",
        "joint-1ep:step6",
    ]
    shrink = front["paths"]["shrink"]["vertices"]
    assert [v["at"] for v in shrink] == sorted(v["at"] for v in shrink)
    assert (shrink[0]["label"], shrink[-1]["label"], shrink[-1]["at"]) == ("theta0", "joint-1ep", 1)
    assert results["heldout"]["families"] == ["chat"]
    assert results["heldout"]["metrics"]["in_style"]["avg"]["theta0"] == pytest.approx(
        style["theta0"]
    )
    assert "joint-1ep:step4" not in results["models"] and "merit-1d:shrink" in results["models"]
    text = run.report.read_text()
    section = text.split("## Controls", 1)[1].split("\n## ", 1)[0]
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in section.splitlines() if "|" in ln}
    alpha = load_controls(run.root)["controls"]["merit-1d:shrink"]["alpha"]
    assert f"| α {alpha:.3f} |" in lines["↳ merit-1d:shrink"]
    assert f"| step {ctl['early']['step']} |" in lines["↳ merit-1d:early"]
    assert "| not reachable |" in lines["↳ merit-1d:shrink-q"]
    loss_col = [c.strip() for c in lines["row"].strip("|").split("|")].index("loss")
    cells = [c.strip() for c in lines["merit-1d"].strip("|").split("|")]
    mean = loss[["merit-1d", "merit-1d@s1"]].mean()  # the table's cells: means over seeds
    assert float(cells[loss_col]) == pytest.approx(mean, abs=1e-4)
    assert "### Held-out families" in text and "figures/frontier" in text
    assert (run.figures / "frontier.html").is_file()


def test_current_controls_are_kept_and_a_removed_one_is_rebuilt(ctl_run):
    cfg, run, _ = ctl_run
    folder = run.root / "controls" / "merit-1d_shrink"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    done = write_controls(cfg)
    assert all(d["seconds"] == 0 for d in done) and len(done) == 8  # 4 controls, 2 seeds
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    import shutil

    shutil.rmtree(folder)
    again = {d["label"]: d for d in write_controls(cfg)}
    assert again["merit-1d:shrink"]["seconds"] > 0 and (folder / "model.safetensors").is_file()
    assert again["merit-1d:early"]["seconds"] == 0


# ------------------------------------------------------------------- config, before any work
def test_each_seed_s_controls_pull_back_that_seed_s_joint_run(ctl_run):
    """merit-1d@s1's controls come from joint/ep1-s1; the report averages them over seeds as
    the merged row's, with their spread beside each difference."""
    _, run, base = ctl_run
    record = load_controls(run.root)
    entry = record["controls"]["merit-1d:shrink@s1"]
    joint = run.root / "joint" / "ep1-s1"
    assert entry["joint"] == "joint/ep1-s1" and entry["controls"] == "merit-1d@s1"
    d_merge = _distance(run.root / "merged" / "merit-1d@s1", base)
    assert entry["alpha"] == pytest.approx(d_merge / _distance(joint / "final", base), rel=1e-9)
    folder = run.root / "controls" / "merit-1d_shrink@s1"
    assert abs(_distance(folder, base) - d_merge) < 1e-6
    early = record["controls"]["merit-1d:early@s1"]
    recorded = [(int(a), float(b)) for a, b in record["joints"]["joint/ep1-s1"]["snapshots"]]
    assert early["step"] == early_step(recorded, d_merge)
    seeds = read_json(run.results)["seeds"]["loss"]
    assert seeds["merit-1d:shrink"]["seeds"] == 2 and "merit-1d:shrink@s1" not in seeds
    table = pd.read_parquet(run.eval)
    both = summarize_eval(table, metric="loss")["avg"][["merit-1d:shrink", "merit-1d:shrink@s1"]]
    assert seeds["merit-1d:shrink"]["mean"] == pytest.approx(both.mean())
    section = run.report.read_text().split("## Controls", 1)[1].split("\n## ", 1)[0]
    line = next(ln for ln in section.splitlines() if ln.startswith("| ↳ merit-1d:shrink |"))
    assert " ± " in line
    assert "merit-1d:shrink@s1" not in read_json(run.results)["models"]


@pytest.mark.parametrize(
    "experiments, train, heldout_clash, problems",
    [
        (
            [*EXPERIMENTS[:3], {"name": "s", "kind": "shrink", "joint": "joint-9ep"}],
            {},
            False,
            ["experiments[3].joint: 'joint-9ep' is not a joint experiment"],
        ),
        (
            [*EXPERIMENTS[:3], {"name": "e", "kind": "early"}],
            {"snapshot_steps": []},
            False,
            [
                "experiments[3]: an early control takes the joint run's weights",
                "set train.snapshot_steps",
            ],
        ),
        (EXPERIMENTS, {}, True, ["eval.heldout: ['add'] are also sources"]),
        (
            [*EXPERIMENTS[:3], {"name": "s", "kind": "shrink", "of": ["merit-2d"]}],
            {},
            False,
            ["experiments[3].of[0]: 'merit-2d' is not a merged row"],
        ),
        (
            [{**EXPERIMENTS[2], "joint": "joint-1ep"}, {"name": "e", "kind": "early"}],
            {"snapshot_steps": []},
            True,
            [
                "experiments[0].joint: only a shrink or early",
                "experiments[1]: kind early pulls back a joint run",
                "experiments[1]: an early control",
                "eval.heldout: ['add']",
            ],
        ),
    ],
)
def test_bad_control_configs_fail_with_one_message_before_any_work(
    assets, tmp_path, experiments, train, heldout_clash, problems
):
    _, base, mix, held = assets
    if heldout_clash:  # a held-out source named like a trained one
        held = _write_heldout(tmp_path / "held")
        write_jsonl(held / "add.jsonl", [chat("add 1 2", "3")])
    train = {"batch_size": 8, "snapshot_steps": SNAPSHOT_STEPS, **train}
    path = _config(tmp_path, base, mix, held, experiments=experiments, train=train)
    with pytest.raises(ValueError) as err:
        run_pipeline(load_config(path))
    message = str(err.value)
    lines = message.splitlines()
    for p in problems:
        assert p in message, message
    assert len(lines) == len({i for p in problems for i, ln in enumerate(lines) if p in ln})
    assert not (tmp_path / "runs").exists()  # no stage ran


def test_snapshot_steps_must_increase(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"snapshot_steps": [4, 2]}}))
    with pytest.raises(ValueError, match=r"train\.snapshot_steps: give optimizer steps >= 1"):
        load_config(path)


def test_control_rows_follow_each_merged_row_and_its_seed(tmp_path):
    """Per seed variant: one row per merged row (``of`` narrows them), named ``<row>:<name>``
    plus the seed mark, averaged into the merged row's base, from that seed's joint run; soups
    (not repeated) under the config's seed, from the joint row's own run."""
    path = tmp_path / "c.yaml"
    experiments = [
        {"name": "joint-1ep", "kind": "joint"},
        {"name": "merit-1d", "merges": ["linear", "ties"]},
        {"name": "soup", "kind": "soup", "seeds": [3, 4]},
        {"name": "shrink", "kind": "shrink"},
        {"name": "early", "kind": "early", "of": ["merit-1d+ties"]},
    ]
    train = {"seed": 0, "seeds": [1], "snapshot_steps": [5]}
    path.write_text(
        yaml.safe_dump({"output_dir": str(tmp_path), "experiments": experiments, "train": train})
    )
    cfg = load_config(path)
    rows = [
        r
        for exp, seed, mark in seed_variants(cfg)
        if exp.kind in CONTROL_KINDS
        for r in ROW_KINDS[exp.kind].rows(cfg, exp, seed, mark)
    ]
    got = {r.label: (r.base, r.controls, r.joint.name, r.seed) for r in rows}
    assert got == {
        "merit-1d:shrink": ("merit-1d:shrink", "merit-1d", "ep1-s0", 0),
        "merit-1d+ties:shrink": ("merit-1d+ties:shrink", "merit-1d+ties", "ep1-s0", 0),
        "soup:shrink": ("soup:shrink", "soup", "ep1-s0", 0),  # a soup: the config's seed
        "merit-1d+ties:early": ("merit-1d+ties:early", "merit-1d+ties", "ep1-s0", 0),
        "merit-1d:shrink@s1": ("merit-1d:shrink", "merit-1d@s1", "ep1-s1", 1),
        "merit-1d+ties:shrink@s1": ("merit-1d+ties:shrink", "merit-1d+ties@s1", "ep1-s1", 1),
        "merit-1d+ties:early@s1": ("merit-1d+ties:early", "merit-1d+ties@s1", "ep1-s1", 1),
    }
    assert all(r.model_dir.parent.name == "controls" and ":" not in r.model_dir.name for r in rows)
    assert {k for k, v in ROW_KINDS.items() if v.control} == set(CONTROL_KINDS)
    cur = None  # controls train nothing: no branch, no spec.json
    assert all(ROW_KINDS[k].branches(cfg, cur, cfg.experiments[3], 0) == [] for k in CONTROL_KINDS)
    from merit_lab.pipeline.rows import branch_spec

    spec = branch_spec(cfg, "joint", ["a"], tmp_path / "j", 1.0, 0, snapshot_steps=(5,))
    assert spec.train.snapshot_steps == (5,)
    assert branch_spec(cfg, "b", ["a"], tmp_path / "b", 1.0, 0).train.snapshot_steps == ()


# ------------------------------------------------------------------ snapshots in the trainer
def _branch_spec(assets, out: Path, **kw):
    from merit_lab.training.spec import BranchSpec

    _, base, mix, _ = assets
    return BranchSpec.from_dict(
        {
            "name": out.name,
            "base_model": str(base),
            "output_dir": str(out),
            "sources": ["add", "max"],
            "mixture": {"path": str(mix), "eval_fraction": 0.1, "seed": 0, "calibration_n": 4},
            "lr": 1e-2,
            "batch_size": 4,
            "max_length": 64,
            "device": "cpu",
            "save_steps": 4,
            **kw,
        }
    )


def test_a_resumed_run_keeps_its_snapshots_and_writes_the_rest_the_same(
    assets, tmp_path, one_thread
):
    """A run that crashed at step 6 resumes from its checkpoint at step 4: it keeps the
    snapshot of step 2 (not written again) and writes step 9 as the run that never stopped."""
    from transformers import TrainerCallback

    from merit_lab.training.trainer import train_branch

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise RuntimeError("killed")

    ref = train_branch(_branch_spec(assets, tmp_path / "ref", snapshot_steps=[2, 9]))
    assert read_json(ref / "merit_branch.json")["steps"] == 9  # 2 x 18 examples, 4 a step
    reference = (ref.parent / "snapshots/step-9/model.safetensors").read_bytes()
    assert reference == (ref / "model.safetensors").read_bytes()  # step 9 is the last
    spec = _branch_spec(assets, tmp_path / "j", snapshot_steps=[2, 9])
    with pytest.raises(RuntimeError, match="killed"):
        train_branch(spec, callbacks=[Crash()])
    snaps = Path(spec.output_dir) / "snapshots"
    assert [p.name for p in snaps.iterdir()] == ["step-2"]
    first = (snaps / "step-2" / "model.safetensors").stat().st_mtime_ns
    train_branch(spec)
    assert (snaps / "step-2" / "model.safetensors").stat().st_mtime_ns == first
    assert (snaps / "step-9" / "model.safetensors").read_bytes() == reference
    assert (snaps / "step-2" / "model.safetensors").read_bytes() == (
        ref.parent / "snapshots/step-2/model.safetensors"
    ).read_bytes()


def test_a_lora_run_snapshots_its_dense_model(assets, tmp_path, one_thread):
    from merit_lab.merging.controls import distance_to_base
    from merit_lab.training.trainer import train_branch

    spec = _branch_spec(assets, tmp_path / "l", snapshot_steps=[3], lora_r=2, lr=5e-2)
    final = train_branch(spec)
    snap = final.parent / "snapshots" / "step-3"
    assert (snap / "adapter").is_dir() and read_json(snap / "snapshot.json")["step"] == 3
    base = assets[1]
    assert set(_weights(snap)) == set(_weights(base))  # θ0's layout: the dense θ0 + s·B·A
    d = distance_to_base(snap, base)
    assert 0 < d < distance_to_base(final, base)
    assert d == pytest.approx(_distance(snap, base), abs=1e-6)
