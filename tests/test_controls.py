"""Tests for merit_lab.merging.controls: distances, the shrink factor and the shrunk checkpoint
against independent torch computations on pico Llama checkpoints, and the early-stopping rule on
hand-made snapshot lists."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merit_lab.merging.controls import distance_to_base, early_step, shrink_alpha, write_shrink
from merit_lab.merging.stream import load_merge_manifest
from merit_lab.models.checkpoints import fingerprint_checkpoint
from merit_lab.models.loading import build_pico_llama

F32_ULP = 2.0**-24  # half an ulp of float32, relative


def _load(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder, straight from its safetensors files."""
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖a − b‖ over the floating-point tensors, float64, one sum over everything."""
    return math.sqrt(
        sum(
            float((a[k].double() - b[k].double()).pow(2).sum())
            for k in b
            if b[k].is_floating_point()
        )
    )


def _save_moved(base: Path, out: Path, scale: float, seed: int, **save_kw) -> Path:
    """θ0 + scale·N(0, 1) (seeded), saved like a branch trained from θ0."""
    model = build_pico_llama(vocab_size=64, seed=0)
    model.load_state_dict(_load(base), strict=False)
    model = model.to(next(iter(_load(base).values())).dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((scale * torch.randn(p.shape, generator=gen)).to(p.dtype))
    model.save_pretrained(out, **save_kw)
    (out / "merit_branch.json").write_text(
        json.dumps({"base_fingerprint": fingerprint_checkpoint(base)})
    )
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """θ0 (one file), a joint run θ0 + 0.01·N (3 shards) and a merge-like θ0 + 0.004·N."""
    root = tmp_path_factory.mktemp("controls")
    build_pico_llama(vocab_size=64, seed=0).save_pretrained(root / "base")
    (root / "base" / "chat_template.jinja").write_text("BASE TEMPLATE")
    joint = _save_moved(root / "base", root / "joint", 0.01, 1, max_shard_size="40KB")
    merged = _save_moved(root / "base", root / "merged", 0.004, 2)
    return {"base": root / "base", "joint": joint, "merged": merged}


# ------------------------------------------------------------------------------------ distances
def test_distance_on_a_hand_worked_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_file(
        {"w": torch.zeros(2, 2), "v": torch.zeros(3), "pos": torch.arange(3)},
        tmp_path / "a" / "model.safetensors",
    )
    save_file(
        {
            "w": torch.tensor([[3.0, 0.0], [0.0, 0.0]]),
            "v": torch.tensor([0.0, 4.0, 0.0]),
            "pos": torch.arange(3) + 7,
        },
        tmp_path / "b" / "model.safetensors",
    )
    assert distance_to_base(tmp_path / "b", tmp_path / "a") == 5.0  # integers are not weights
    assert distance_to_base(tmp_path / "a", tmp_path / "a") == 0.0


def test_distance_matches_torch_on_sharded_checkpoints(family):
    base, joint = _load(family["base"]), _load(family["joint"])
    assert len(list(family["joint"].glob("*.safetensors"))) == 3  # read through the index
    want = _distance(joint, base)
    got = distance_to_base(family["joint"], family["base"])
    assert got == pytest.approx(want, rel=6e-8)  # the float32 difference: 2^-24 per entry
    assert distance_to_base(family["base"], family["joint"]) == pytest.approx(got, rel=1e-15)
    # the noise was 0.01·N(0, 1) on every parameter
    n = sum(v.numel() for v in base.values())
    assert got == pytest.approx(0.01 * math.sqrt(n), rel=0.02)


def test_distance_of_a_lora_branch_is_its_dense_update(tmp_path):
    """A LoRA branch's final/ holds θ0 + s·B·A beside adapter/: the distance is ‖s·B·A‖,
    computed here from the adapter's own files in float64."""
    from peft import get_peft_model

    from merit_lab.merging.lora import save_lora_branch
    from merit_lab.models.loading import load_model
    from merit_lab.models.lora import make_lora_config

    build_pico_llama(vocab_size=64, seed=0).save_pretrained(tmp_path / "base")
    torch.manual_seed(3)
    model = get_peft_model(load_model(tmp_path / "base", device="cpu"), make_lora_config(4, 8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    final = tmp_path / "final"
    save_lora_branch(final, model, tmp_path / "base", "merit_branch.json", {"lora": True})
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    cfg = json.loads((final / "adapter" / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    sq = sum(
        float(
            (s * adapter[k.replace("lora_A", "lora_B")].double() @ adapter[k].double()).pow(2).sum()
        )
        for k in adapter
        if k.endswith("lora_A.weight")
    )
    base = _load(tmp_path / "base")
    # the dense folder rounds θ0 + s·B·A once to float32: at most half an ulp per entry
    bound = F32_ULP * math.sqrt(sum(float(v.double().pow(2).sum()) for v in base.values()))
    assert abs(distance_to_base(final, tmp_path / "base") - math.sqrt(sq)) <= 1.01 * bound + 1e-12
    assert math.sqrt(sq) > 100 * bound  # the check is not swamped by the rounding


def test_distance_refuses_another_architecture(family, tmp_path):
    build_pico_llama(vocab_size=64, seed=0, hidden_size=48).save_pretrained(tmp_path / "wide")
    shapes = r"'lm_head.weight' is F32\[64, 48\] in .* but F32\[64, 32\] in θ0"
    with pytest.raises(ValueError, match=shapes):
        distance_to_base(tmp_path / "wide", family["base"])
    build_pico_llama(vocab_size=64, seed=0, layers=3).save_pretrained(tmp_path / "deep")
    with pytest.raises(ValueError, match="different architectures: 0 of θ0's .* 9 extra"):
        distance_to_base(tmp_path / "deep", family["base"])
    with pytest.raises(ValueError, match="no model.safetensors"):
        distance_to_base(tmp_path, family["base"])


# ---------------------------------------------------------------------------------------- alpha
def test_alpha_by_hand():
    assert shrink_alpha(4.0, 1.0) == 0.25
    assert shrink_alpha(2.5, 2.5) == 1.0
    assert shrink_alpha(8.0, 3.0) == 0.375


@pytest.mark.parametrize(
    ("joint", "target", "message"),
    [
        (2.0, 3.0, r"farther from θ0 than joint \(2\).*α = 1.5000 > 1 would extrapolate"),
        (2.0, 0.0, "α ≤ 0"),
        (2.0, -1.0, "α ≤ 0"),
        (0.0, 1.0, "it equals θ0"),
        (float("nan"), 1.0, "must be finite"),
        (2.0, float("inf"), "must be finite"),
    ],
)
def test_alpha_refuses(joint, target, message):
    with pytest.raises(ValueError, match=message):
        shrink_alpha(joint, target)


# ---------------------------------------------------------------------------------- the shrink
def test_shrink_is_theta0_plus_alpha_delta_at_the_target_distance(family, tmp_path):
    target = distance_to_base(family["merged"], family["base"])
    alpha = shrink_alpha(distance_to_base(family["joint"], family["base"]), target)
    theta0, theta_j = _load(family["base"]), _load(family["joint"])
    # each distance within 6e-8 of its float64 value (a float32 difference), so α within 1.2e-7
    assert alpha == pytest.approx(
        _distance(_load(family["merged"]), theta0) / _distance(theta_j, theta0), rel=1.2e-7
    )
    assert 0.3 < alpha < 0.5  # 0.004 / 0.01, up to the draws
    out = write_shrink(
        family["base"], family["joint"], alpha, tmp_path / "shrink", target_distance=target
    )
    assert out == tmp_path / "shrink"
    written = _load(out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]  # θ0's layout
    assert set(written) == set(theta0)
    for key, w in written.items():
        t0, tj = theta0[key], theta_j[key]
        assert w.dtype == t0.dtype and w.shape == t0.shape
        want = t0.double() + alpha * (tj.double() - t0.double())
        # a float32 linear merge: a few roundings of the inputs' magnitude per entry
        bound = 4 * F32_ULP * (t0.double().abs() + tj.double().abs()) + 1e-30
        assert ((w.double() - want).abs() <= bound).all(), key
    dist = _distance(written, theta0)
    assert dist == pytest.approx(target, rel=1e-6)
    manifest = load_merge_manifest(out)
    assert manifest["method"] == "linear"
    assert manifest["weights"] == pytest.approx([1 - alpha, alpha], abs=1e-15)
    assert [i["path"] for i in manifest["inputs"]] == [
        str(family["base"].resolve()),
        str(family["joint"].resolve()),
    ]
    control = manifest["control"]
    assert control["kind"] == "shrink" and control["alpha"] == alpha
    assert control["target_distance"] == target
    assert control["distance_to_base"] == pytest.approx(dist, rel=6e-8)
    mk = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert [m["parameters"]["weight"] for m in mk["models"]] == pytest.approx([1 - alpha, alpha])
    # θ0's side files, not the joint run's record of itself
    assert (out / "chat_template.jinja").read_text() == "BASE TEMPLATE"
    assert (out / "config.json").read_bytes() == (family["base"] / "config.json").read_bytes()
    assert not (out / "merit_branch.json").exists()


def test_shrink_at_alpha_one_is_joint_and_keeps_bfloat16(tmp_path):
    build_pico_llama(vocab_size=64, seed=0).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    joint = _save_moved(tmp_path / "base", tmp_path / "joint", 0.01, 1)
    one = _load(write_shrink(tmp_path / "base", joint, 1.0, tmp_path / "one"))
    theta0, theta_j = _load(tmp_path / "base"), _load(joint)
    assert all(torch.equal(one[k], theta_j[k]) for k in theta_j)
    half = _load(write_shrink(tmp_path / "base", joint, 0.5, tmp_path / "half"))
    for key, w in half.items():
        assert w.dtype == torch.bfloat16
        want = theta0[key].float() + 0.5 * (theta_j[key].float() - theta0[key].float())
        # rounded once to bfloat16 (8 bits): within one bf16 ulp of the float32 value
        assert ((w.float() - want).abs() <= 2.0**-7 * want.abs() + 1e-30).all(), key
    manifest = load_merge_manifest(tmp_path / "half")
    assert manifest["output"]["dtype"] == "BF16" and manifest["control"]["target_distance"] is None


def _left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("alpha", [0.0, -0.2, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_shrink_refuses_alpha_out_of_range_before_writing(family, tmp_path, alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        write_shrink(family["base"], family["joint"], alpha, tmp_path / "out")
    assert _left_in(tmp_path) == []


def test_shrink_refuses_other_architectures_and_bases_before_writing(family, tmp_path):
    (tmp_path / "in").mkdir()
    wide, deep = tmp_path / "in" / "wide", tmp_path / "in" / "deep"
    build_pico_llama(vocab_size=64, seed=0, hidden_size=48).save_pretrained(wide)
    build_pico_llama(vocab_size=64, seed=0, layers=3).save_pretrained(deep)
    half = tmp_path / "in" / "half"
    build_pico_llama(vocab_size=64, seed=0).to(torch.bfloat16).save_pretrained(half)
    for joint, message in (
        (wide, r"is F32\[64, 48\] in .* but F32\[64, 32\] in θ0"),
        (deep, "different architectures"),
        (half, r"is BF16\[.*\] in .* but F32\[.*\] in θ0"),
    ):
        with pytest.raises(ValueError, match=message):
            write_shrink(family["base"], joint, 0.5, tmp_path / "out")
        assert _left_in(tmp_path) == ["in"]
    # a joint run trained from another θ0: its merit_branch.json says so, and nothing is left
    other = tmp_path / "in" / "other"
    build_pico_llama(vocab_size=64, seed=5).save_pretrained(tmp_path / "in" / "base5")
    _save_moved(tmp_path / "in" / "base5", other, 0.01, 1)
    with pytest.raises(ValueError, match="trained from a different base"):
        write_shrink(family["base"], other, 0.5, tmp_path / "out")
    assert _left_in(tmp_path) == ["in"]
    with pytest.raises(ValueError, match="is one of the inputs"):
        write_shrink(family["base"], family["joint"], 0.5, family["joint"], overwrite=True)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        write_shrink(family["base"], family["joint"], 0.5, tmp_path / "out")
    with pytest.raises(ValueError, match="target_distance"):
        write_shrink(family["base"], family["joint"], 0.5, tmp_path / "x", target_distance=0.0)
    assert _left_in(tmp_path) == ["in", "out"] and _left_in(tmp_path / "out") == []


# ------------------------------------------------------------------------------ early stopping
RUN = [(0, 0.0), (10, 0.5), (20, 1.0), (30, 1.5)]


@pytest.mark.parametrize(
    ("target", "step"),
    [(0.2, 10), (0.5, 10), (0.7, 20), (1.0, 20), (1.5, 30), (1.6, None), (1e-9, 10)],
)
def test_early_step_is_the_first_snapshot_at_or_past_the_target(target, step):
    assert early_step(RUN, target) == step


def test_early_step_ties_and_dips():
    snaps = [(0, 0.0), (5, 1.2), (10, 1.2), (15, 0.9), (20, 1.3)]
    assert early_step(snaps, 1.2) == 5  # two snapshots tie at the target: the earlier
    assert early_step(snaps, 1.0) == 5  # reached, then the distance dips below: still 5
    assert early_step(snaps, 1.25) == 20  # only the last one reaches it
    assert early_step(snaps, 1.31) is None  # never reached: no control, not the last snapshot
    assert early_step([(7, 2.0)], 2.0) == 7  # without step 0


@pytest.mark.parametrize(
    ("snaps", "target", "message"),
    [
        ([], 1.0, "no snapshots"),
        ([(0, 0.0), (20, 1.0), (10, 2.0)], 1.0, "strictly increasing"),
        ([(0, 0.0), (10, 1.0), (10, 2.0)], 1.0, "strictly increasing"),
        ([(-1, 0.0)], 1.0, "strictly increasing"),
        ([(0, 0.0), (2.5, 1.0)], 1.0, "integers"),
        ([(0, 0.0), (10, -1.0)], 1.0, "distance -1.0"),
        ([(0, 0.0), (10, float("nan"))], 1.0, "distance nan"),
        (RUN, 0.0, "target_distance"),
        (RUN, float("nan"), "target_distance"),
    ],
)
def test_early_step_refuses(snaps, target, message):
    with pytest.raises(ValueError, match=message):
        early_step(snaps, target)


def test_early_step_on_measured_snapshots(family, tmp_path):
    """Snapshots θ0 + (s/10)(θ_joint − θ0) at s = 0, 2, …, 10, measured from their folders: a
    target of 0.43·‖θ_joint − θ0‖ is first reached at s = 6 (0.4 < 0.43 ≤ 0.6)."""
    d_joint = distance_to_base(family["joint"], family["base"])
    snaps = []
    for s in range(0, 11, 2):
        folder = family["base"] if s == 0 else tmp_path / f"s{s}"
        if s:
            write_shrink(family["base"], family["joint"], s / 10, folder)
        snaps.append((s, distance_to_base(folder, family["base"])))
    assert [d for _, d in snaps] == pytest.approx([s / 10 * d_joint for s, _ in snaps], rel=1e-6)
    assert early_step(snaps, 0.43 * d_joint) == 6
    assert early_step(snaps, 0.6 * d_joint * (1 - 1e-3)) == 6
    assert early_step(snaps, 1.001 * d_joint) is None
