"""The diagnostics stage on a small finished run: files, identities, resumption, report lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from merit_lab.gradients.bank import GradientBank
from merit_lab.io import read_json
from merit_lab.partition.gain import predict_gain
from merit_lab.partition.plan import Partition
from merit_lab.pipeline import run_pipeline
from merit_lab.pipeline.diagnose import (
    BARRIER_NOISE,
    DIAGNOSTICS,
    RunProbe,
    diagnostics_figures,
    diagnostics_section,
    diagnostics_tables,
    run_diagnostics,
)
from tests.test_experiments import _config, slice_dir  # noqa: F401  (slice_dir: a fixture)

SETTINGS = {
    "max_examples": 3,
    "alphas": 5,
    "sigmas": (0.0, 3e-3, 1e-2),
    "seeds": (0, 1),
    "hessian_k": 4,
    "hessian_iter": 8,
    "curvature_examples": 2,
    "progress": False,
}


@pytest.fixture(scope="module")
def diag_run(slice_dir, tmp_path_factory):  # noqa: F811
    """joint 1 and 2 epochs, MERIT-1D and a random K=2 split (a different grouping)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs")
    experiments = [
        {"name": "joint-1ep", "kind": "joint", "epochs": 1},
        {"name": "joint-2ep", "kind": "joint", "epochs": 2},
        {"name": "merit-1d"},
        {"name": "random-k2", "method": "random", "k": 2, "seed": 0},
    ]
    cfg = _config(
        slice_dir,
        out,
        experiments=experiments,
        eval={"max_examples": 2, "exact_match": False, "splits": ["eval"]},
    )
    run = run_pipeline(cfg, until="evaluate")  # the report stage is not needed here
    yield run, run_diagnostics(run.root, **SETTINGS)
    torch.set_num_threads(threads)


def test_the_registry_writes_the_files_the_report_reads():
    from merit_lab.pipeline import report_diagnostics

    assert tuple(DIAGNOSTICS) == tuple(report_diagnostics.DIAGNOSTICS)


def test_every_file_is_written_with_its_key(diag_run):
    run, results = diag_run
    folder = run.root / "diagnostics"
    for name in DIAGNOSTICS:
        data = read_json(folder / f"{name}.json")
        assert data == results[name] and len(data["key"]) == 16
    assert (folder / "curvature.safetensors").is_file()
    assert results["paths"]["settings"]["experiments"] == ["merit-1d", "random-k2"]


def test_paths_cover_every_pair_and_a_path_to_itself_is_flat(diag_run):
    run, results = diag_run
    paths = pd.DataFrame(results["paths"]["paths"])
    # per K=2 split: 1 branch pair, 2 branch→merged, θ0→merged, joint-1ep→merged; two splits
    assert len(paths) == 2 * 5 * 2
    assert set(paths.loc[paths.kind == "joint-merged", "a"]) == {"joint-1ep"}
    losses = results["paths"]["losses"]
    for p in paths.itertuples():
        split = "train" if p.split == "train" else "eval"
        assert p.loss_a == pytest.approx(losses[p.a][split], rel=1e-5)
        assert p.loss_b == pytest.approx(losses[p.b][split], rel=1e-5)
        assert p.barrier == max(0.0, max(p.excess)) and len(p.losses) == 5
    probe = RunProbe(run.root, max_examples=SETTINGS["max_examples"])
    curves = probe.path("merit-1d", "merit-1d", np.linspace(0, 1, 5))
    for split, c in curves.items():
        assert c["barrier"] == 0.0
        np.testing.assert_allclose(c["losses"], losses["merit-1d"][split], rtol=1e-6)


def test_displacement_of_merged_equals_the_norm_from_safetensors(diag_run):
    run, results = diag_run
    theta0 = load_file(_theta0(run) / "model.safetensors")
    merged = load_file(run.root / "merged" / "merit-1d" / "model.safetensors")
    want = sum(float((merged[k].double() - theta0[k].double()).pow(2).sum()) for k in theta0)
    models = results["displacement"]["models"]
    assert models["merit-1d"]["total"] == pytest.approx(want**0.5, rel=1e-12)
    assert models["merit-1d"]["kind"] == "split" and models["merit-1d/0"]["kind"] == "branch"
    layers = models["merit-1d"]["per_layer"]
    assert sum(v**2 for v in layers.values()) == pytest.approx(want, rel=1e-9)
    ablation = pd.DataFrame(results["displacement"]["ablation"])
    assert sorted(ablation["epoch"].unique()) == [1, 2] and len(ablation) == 4
    row = ablation[(ablation.joint == "joint-2ep") & (ablation.merged == "merit-1d")].iloc[0]
    assert row["ratio"] == pytest.approx(models["joint-2ep"]["total"] / want**0.5)
    assert row["gap"] == pytest.approx(row["merged_train_loss"] - row["joint_train_loss"])


def _theta0(run) -> Path:
    from merit_lab.models.loading import resolve_model_path

    return Path(resolve_model_path(run.load_config().model))


def test_norm_inequality_and_measured_gain_from_recorded_losses(diag_run):
    run, results = diag_run
    bank = GradientBank.load(run.gradients)
    curv = load_file(run.root / "diagnostics" / "curvature.safetensors")
    lam, u = curv["eigvals"].double().numpy(), curv["eigvecs"].double().numpy()
    assert u.shape == (results["curvature"]["dim"], 4)
    np.testing.assert_allclose(lam, results["curvature"]["eigvals"], rtol=1e-12)
    losses = results["paths"]["losses"]
    gains = {}
    for e in results["gain"]["experiments"]:
        w = np.array(e["weights"])
        assert w.sum() == pytest.approx(1.0)
        for split in ("train", "eval"):
            bl = np.array(e["branch_losses"][split])
            assert bl.tolist() == [losses[b][split] for b in e["branches"]]
            want = float(w @ bl) - e["merged_loss"][split]
            assert e["measured_gain"][split] == pytest.approx(want, abs=1e-12)
        ni = e["norm_inequality"]
        assert ni["holds"] and ni["lhs"] <= ni["rhs"]
        assert ni["rhs"] - ni["lhs"] == pytest.approx(ni["spread"], rel=1e-6)
        assert ni["merged_checkpoint_lhs"] == pytest.approx(ni["lhs"], rel=1e-5)
        # ½ Σ λ Var_w(uᵀδ) recomputed from the stored eigenvectors and the branch checkpoints
        t0 = load_file(_theta0(run) / "model.safetensors")
        names = results["curvature"]["parameters"]
        deltas = []
        for b in e["branches"]:
            exp, k = b.split("/")
            sd = load_file(run.root / "branches" / exp / k / "final" / "model.safetensors")
            deltas.append(torch.cat([(sd[n].double() - t0[n].double()).reshape(-1) for n in names]))
        c = torch.stack(deltas).numpy() @ u
        var = w @ (c - w @ c) ** 2
        assert e["quadratic"]["gain"] == pytest.approx(float(0.5 * lam @ var), rel=1e-6)
        sf = pd.DataFrame(e["spectral_filtering"])
        np.testing.assert_allclose(sf["branch_energy"] - sf["merged_energy"], var, rtol=1e-6)
        part = Partition.load(run.root / "branches" / e["experiment"] / "partition.json")
        pred = predict_gain(part, bank.rows, bank.names)
        assert e["predicted_partition_gain"]["identity"] == pytest.approx(pred, rel=1e-9)
        gains[e["experiment"]] = pred
    assert gains["merit-1d"] != pytest.approx(gains["random-k2"])  # two different groupings


def test_perturbation_table(diag_run):
    _, results = diag_run
    p = results["perturbation"]
    draws = pd.DataFrame(p["draws"])
    branches = {"merit-1d/0", "merit-1d/1", "random-k2/0", "random-k2/1"}
    assert set(draws["model"]) == {"merit-1d", "random-k2", "joint-1ep", "joint-2ep", *branches}
    assert (draws.loc[draws.sigma == 0, "delta"] == 0).all()
    np.testing.assert_allclose(draws["relative_delta"], draws["delta"] / draws["base_loss"])
    summary = pd.DataFrame(p["summary"]).set_index(["model", "sigma"])
    mean = draws.groupby(["model", "sigma"])["delta"].mean()
    np.testing.assert_allclose(summary.loc[mean.index, "delta_mean"], mean, atol=1e-15)
    assert (summary["n"] == 2).all()


def test_rerun_skips_and_a_changed_setting_redoes_only_its_file(diag_run):
    run, results = diag_run
    folder = run.root / "diagnostics"
    files = sorted(folder.iterdir())
    before = {f: f.stat().st_mtime_ns for f in files}
    again = run_diagnostics(run.root, **SETTINGS)
    assert again == results
    assert {f: f.stat().st_mtime_ns for f in files} == before
    run_diagnostics(run.root, **{**SETTINGS, "seeds": (0,)})
    changed = {f.name for f in files if f.stat().st_mtime_ns != before[f]}
    assert changed == {"perturbation.json"}
    run_diagnostics(run.root, **SETTINGS)  # back to the module's settings


def test_section_has_the_tables_and_facts_from_the_numbers(diag_run):
    run, results = diag_run
    lines = diagnostics_section(run.root, image_formats=())
    text = "\n".join(lines)
    tables = diagnostics_tables(run.root)
    for heading in [
        "## Merge-readiness diagnostics",
        "### Linear interpolation barriers",
        "### Distance to θ0",
        "### Flatness under Gaussian weight noise",
        "### Curvature at θ0",
        "### Merging gain: measured vs predicted",
    ]:
        assert heading in lines
    assert "| experiment | path | paths |" in text
    assert "| experiment | method | K | predicted before training (H=I) |" in text
    assert "| epoch | joint | merged |" in text
    paths = pd.DataFrame(results["paths"]["paths"])
    train = paths[paths.split == "train"]
    top = train[["loss_a", "loss_b"]].max(axis=1)
    n = int((train.barrier > BARRIER_NOISE * top).sum())
    assert f"- train loss: a barrier on {n} of {len(train)} paths" in text
    n_holds = sum(e["norm_inequality"]["holds"] for e in results["gain"]["experiments"])
    assert f"holds in {n_holds} of 2 experiments" in text
    gain = tables["gain"]
    assert gain.loc["merit-1d", "measured G train"] == pytest.approx(
        results["gain"]["experiments"][0]["measured_gain"]["train"]
    )
    for stem in diagnostics_figures(run.root):
        assert (run.root / "figures" / f"{stem}.html").is_file()
        assert f"figures/{stem}" in text
    assert {
        "diag_paths_merit-1d",
        "diag_displacement",
        "diag_perturbation",
        "diag_spectral_random-k2",
    } <= set(diagnostics_figures(run.root))


def test_pretokenised_loss_fn_equals_heldout_loss(diag_run):
    from merit_lab.evaluation.evaluate import heldout_loss

    run, _ = diag_run
    probe = RunProbe(run.root, max_examples=SETTINGS["max_examples"])
    model = probe.load("merit-1d")
    for split, fn in probe.loss_fns.items():
        want = heldout_loss(model, probe.tokenizer, probe.examples(split), batch_size=5)
        assert fn(model) == pytest.approx(want, rel=1e-6)
