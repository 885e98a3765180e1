"""Tests for merit_lab.merging (methods, stream): numbers against independent computations on
pico Llama checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from benchmarks.bench_merge import mergekit_yaml
from merit_lab.envelope import HEADER, EnvelopeError
from merit_lab.merging.digests import file_digest
from merit_lab.merging.methods import merge_linear, merge_task_arithmetic, merge_ties
from merit_lab.merging.stream import (
    fingerprint_checkpoint,
    load_merge_manifest,
    merge_checkpoints,
    save_merge_manifest,
)

K = 3
WEIGHTS = [0.5, 0.3, 0.2]
SHARD = 40_000  # bytes: the ~91 KB fp32 pico model splits into 3 shards


def _config(**kw) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        **kw,
    )


def _save_family(root: Path, dtype: torch.dtype, **cfg_kw) -> tuple[Path, list[Path]]:
    """θ0 plus K branches θ0 + 0.01·N(0, 1) (seeded per branch), saved sharded by transformers."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(**cfg_kw)).to(dtype)
    model.save_pretrained(root / "base", max_shard_size="40KB")
    (root / "base" / "chat_template.jinja").write_text("BASE TEMPLATE")
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    base_fp = fingerprint_checkpoint(root / "base")
    branches = []
    for k in range(K):
        gen = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(theta0[name] + 0.01 * torch.randn(p.shape, generator=gen).to(dtype))
        model.save_pretrained(root / f"b{k}", max_shard_size="40KB")
        (root / f"b{k}" / "chat_template.jinja").write_text("BRANCH TEMPLATE")
        (root / f"b{k}" / "merit_branch.json").write_text(json.dumps({"base_fingerprint": base_fp}))
        branches.append(root / f"b{k}")
    return root / "base", branches


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> tuple[Path, list[Path]]:
    return _save_family(tmp_path_factory.mktemp("fp32"), torch.float32)


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> tuple[Path, list[Path]]:
    return _save_family(tmp_path_factory.mktemp("bf16"), torch.bfloat16)


def _load(folder: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12)[None] % 64).logits


def _no_trace(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "temp folder left behind"


# ----------------------------------------------------------------------------- linear / uniform
def test_linear_fp32_matches_float64_average_and_loads(fp32, tmp_path):
    _, branches = fp32
    report = merge_checkpoints(branches, tmp_path / "m", weights=WEIGHTS, shard_size=SHARD)
    sds = [_load(b) for b in branches]
    ref = {
        n: sum(w * sd[n].double() for w, sd in zip(WEIGHTS, sds, strict=True)).float()
        for n in sds[0]
    }
    out = _load(tmp_path / "m")
    assert len(list((tmp_path / "m").glob("model-*-of-00003.safetensors"))) == 3
    assert out.keys() == ref.keys() and report.n_tensors == len(ref) == 21
    for n in ref:
        assert out[n].dtype == torch.float32
        torch.testing.assert_close(out[n], ref[n], rtol=1e-6, atol=1e-8)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    independent = LlamaForCausalLM(_config())
    independent.load_state_dict(ref)
    torch.testing.assert_close(_logits(merged), _logits(independent), rtol=1e-5, atol=1e-6)


def test_linear_bf16_stays_bf16_and_equals_fp32_accumulation(bf16, tmp_path):
    _, branches = bf16
    merge_checkpoints(branches, tmp_path / "m", weights=WEIGHTS, shard_size=SHARD, progress=False)
    sds = [_load(b) for b in branches]
    out = _load(tmp_path / "m")
    for n in sds[0]:
        # the float32 accumulation merge_linear does: w0·θ0, then fused θ += w·θ_k
        acc = sds[0][n].float() * WEIGHTS[0]
        for w, sd in zip(WEIGHTS[1:], sds[1:], strict=True):
            acc.add_(sd[n].float(), alpha=w)
        assert out[n].dtype == torch.bfloat16
        assert torch.equal(out[n], acc.to(torch.bfloat16)), n
        # and within one bf16 rounding of the exact (float64) average
        exact = sum(w * sd[n].double() for w, sd in zip(WEIGHTS, sds, strict=True))
        torch.testing.assert_close(out[n].double(), exact, rtol=2**-8, atol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert merged.model.embed_tokens.weight.dtype == torch.bfloat16


def test_uniform_equals_linear_with_equal_weights(fp32, tmp_path):
    _, branches = fp32
    merge_checkpoints(branches, tmp_path / "u", method="uniform", progress=False)
    merge_checkpoints(branches, tmp_path / "l", weights=[1 / 3] * 3, progress=False)
    u, lin = _load(tmp_path / "u"), _load(tmp_path / "l")
    assert all(torch.equal(u[n], lin[n]) for n in u)
    assert [p.name for p in (tmp_path / "u").glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "u" / "model.safetensors.index.json").exists()  # as save_pretrained


def test_linear_into_a_given_buffer_gives_the_same_bits():
    # merge_checkpoints reuses two buffers for the results of linear merges (no page faults)
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(5, 7, generator=gen) for _ in range(K)]
    buf = torch.full((5, 7), float("nan"))
    out = merge_linear(ts, WEIGHTS, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(out, merge_linear(ts, WEIGHTS))


def test_tied_embeddings_keep_the_inputs_keys(tmp_path):
    base, branches = _save_family(tmp_path / "tied", torch.float32, tie_word_embeddings=True)
    merge_checkpoints(branches, tmp_path / "m", base=base, progress=False)
    out = _load(tmp_path / "m")
    assert out.keys() == _load(branches[0]).keys() and "lm_head.weight" not in out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(merged.lm_head.weight, out["model.embed_tokens.weight"])


# --------------------------------------------------------------------- task vectors, by hand
def test_task_arithmetic_by_hand():
    base = torch.tensor([1.0, 2.0, 3.0])
    a, b = torch.tensor([2.0, 2.0, 2.0]), torch.tensor([1.0, 4.0, 3.0])  # δ = [1,0,-1], [0,2,0]
    got = merge_task_arithmetic([a, b], [1.0, 1.0], base, lambda_=0.5)
    assert torch.equal(got, torch.tensor([1.5, 3.0, 2.5]))  # θ0 + 0.5·[1, 2, -1]
    got = merge_task_arithmetic([a, b], [0.25, 0.75], base)
    assert torch.equal(got, torch.tensor([1.25, 3.5, 2.75]))  # θ0 + [.25, 1.5, -.25]


def test_ties_by_hand():
    base = torch.ones(5)
    deltas = [
        torch.tensor([0.5, -0.1, 0.3, -0.8, 0.05]),  # top-3 |.|: 0.8, 0.5, 0.3
        torch.tensor([-0.2, 0.4, 0.6, -0.1, 0.7]),  # top-3: 0.7, 0.6, 0.4
        torch.tensor([-0.9, 0.2, -0.05, 0.3, -0.6]),  # top-3: 0.9, 0.6, 0.3
    ]
    # trimmed:  [.5, 0, .3, -.8, 0], [0, .4, .6, 0, .7], [-.9, 0, 0, .3, -.6]
    # sum:      [-.4, .4, .9, -.5, .1]  -> elected signs [-, +, +, -, +]
    # agreeing: [-.9], [.4], [.3, .6], [-.8], [.7]  -> disjoint mean [-.9, .4, .45, -.8, .7]
    got = merge_ties([base + d for d in deltas], [1.0] * 3, base, density=0.6, lambda_=0.5)
    want = base + 0.5 * torch.tensor([-0.9, 0.4, 0.45, -0.8, 0.7])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_ties_weighted_election_and_zero_sum_counts_as_plus():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([-3.0, 1.0])
    # weighted: [3, -6], [-3, 1]; sum [0, -5] -> signs [+, -]; mean [3/3, -6/3]
    got = merge_ties([a, b], [3.0, 1.0], base)
    assert torch.equal(got, torch.tensor([1.0, -2.0]))
    # unweighted: sum [-2, -1] -> [-, -]; agreeing [-3], [-2]
    assert torch.equal(merge_ties([a, b], [1.0, 1.0], base), torch.tensor([-3.0, -2.0]))


# mergekit 0.1.5 (mergekit/merge_methods/generalized_task_arithmetic.py, sparsify.py), which we
# follow: task_arithmetic = θ0 + λ Σ_k w_k δ_k with normalize off by default; ties = sparsify
# "magnitude" (keep the int(density · numel) largest |δ_k| of each whole tensor: argsort over the
# flattened tensor, not per row; no rescale by default), then weight (w_k δ̂_k), elect the sign
# of Σ_k w_k δ̂_k (consensus "sum", a zero sum counts as +), keep the entries of that sign, and
# with normalize on (the ties default) divide by the sum of the kept entries' w_k; then × λ.
THETA0 = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -0.5]])
DELTAS = [
    torch.tensor([[0.4, -0.2, 0.1], [-0.6, 0.3, 0.05]]),
    torch.tensor([[-0.1, 0.5, -0.3], [0.2, -0.7, 0.15]]),
    torch.tensor([[-0.25, 0.05, 0.35], [0.45, -0.15, -0.55]]),
]
W3 = [0.5, 1.0, 2.0]  # free weights (not summing to 1), as mergekit allows for task vectors


def test_task_arithmetic_by_hand_2d_free_weights_no_normalize():
    # 0.5·δ1 = [[.2, -.1, .05], [-.3, .15, .025]]
    #     δ2 = [[-.1, .5, -.3], [.2, -.7, .15]]
    #   2·δ3 = [[-.5, .1, .7], [.9, -.3, -1.1]]
    # sum    = [[-.4, .5, .45], [.8, -.85, -.925]]   (not divided by Σw = 3.5: normalize off)
    # ×λ=0.5 = [[-.2, .25, .225], [.4, -.425, -.4625]]; + θ0:
    want = torch.tensor([[0.8, -0.75, 0.725], [0.4, 1.575, -0.9625]])
    got = merge_task_arithmetic([THETA0 + d for d in DELTAS], W3, THETA0, lambda_=0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_ties_by_hand_2d_weighted_sum_election_and_weighted_disjoint_mean():
    # density 0.7 of 6 entries: int(4.2) = 4 kept per task vector, over the whole 2×3 tensor
    #   δ̂1 = [[.4, -.2, 0], [-.6, .3, 0]]        (drops .1, .05)
    #   δ̂2 = [[0, .5, -.3], [.2, -.7, 0]]        (drops -.1, .15)
    #   δ̂3 = [[-.25, 0, .35], [.45, 0, -.55]]    (drops .05, -.15)
    # weighted by [.5, 1, 2]:
    #   [[.2, -.1, 0], [-.3, .15, 0]], [[0, .5, -.3], [.2, -.7, 0]], [[-.5, 0, .7], [.9, 0, -1.1]]
    # sum [[-.3, .4, .4], [.8, -.55, -1.1]] -> elected [[-, +, +], [+, -, -]]
    #   ((0, 0) is the weighted sum's call: unweighted .4 - .25 > 0 and a sign count 1:1 would
    #   both say +)
    # agreeing weighted entries / their weights:
    #   (0,0) -.5/2 = -.25   (0,1) .5/1 = .5   (0,2) .7/2 = .35
    #   (1,0) (.2 + .9)/(1 + 2) = 11/30   (1,1) -.7/1 = -.7   (1,2) -1.1/2 = -.55
    #   ((1,0) without normalize would be 1.1; a plain mean of the raw deltas .325)
    # ×λ=0.5 = [[-.125, .25, .175], [11/60, -.35, -.275]]; + θ0:
    want = torch.tensor([[0.875, -0.75, 0.675], [11 / 60, 1.65, -0.775]])
    got = merge_ties([THETA0 + d for d in DELTAS], W3, THETA0, density=0.7, lambda_=0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_ties_keeps_exactly_k_when_magnitudes_tie_at_the_cutoff():
    # δ = [.5, .5, .5, .1], density 0.5 -> k = 2 of three tied .5s. Which two is not defined:
    # ours takes torch.topk's, mergekit torch.argsort's (unstable) pick. On bf16 checkpoints such
    # ties are common, so ours and mergekit's TIES can differ there (test below), nowhere else.
    base = torch.zeros(4)
    got = merge_ties([torch.tensor([0.5, 0.5, 0.5, 0.1])], [1.0], base, density=0.5)
    assert sorted(got.tolist()) == [0.0, 0.0, 0.5, 0.5]


def _task_arithmetic_reference(ts, weights, b, lam):
    """θ0 + λ Σ_k w_k (θ_k − θ0), in float64."""
    b = b.double()
    return b + lam * sum(w * (t.double() - b) for t, w in zip(ts, weights, strict=True))


def _ties_reference(ts, weights, b, density, lam):
    """TIES from its definition (see the hand-worked case), in float64 over the task vectors
    θ_k − θ0 taken in float32 (as both implementations take them, so the trim sees the same
    magnitudes). The kept set must be unique: no tie at the cutoff (asserted)."""
    w = torch.tensor(weights, dtype=torch.float64)[:, None]
    trimmed = []
    for t in ts:
        d = (t - b).flatten()
        k = int(density * d.numel())
        mags, order = d.abs().sort(descending=True, stable=True)
        assert k == d.numel() or mags[k - 1] > mags[k], "tie at the cutoff"
        kept = torch.zeros(d.numel(), dtype=torch.float64)
        kept[order[:k]] = d[order[:k]].double()
        trimmed.append(kept)
    wd = torch.stack(trimmed) * w
    elected = torch.where(wd.sum(0) >= 0, 1.0, -1.0).double()
    agree = torch.sign(wd) == elected
    num, den = (wd * agree).sum(0), (w * agree).sum(0)
    den[den == 0] = 1.0
    return b.double() + lam * (num / den).view(b.shape)


@pytest.mark.parametrize(
    ("method", "weights", "params"),
    [
        ("ties", [1.0, 0.6, 0.3], {"density": 0.5, "lambda": 0.8}),
        ("task_arithmetic", [0.5, 0.3, 0.2], {"lambda": 0.7}),
    ],
)
def test_task_vector_checkpoints_match_a_plain_torch_computation(
    fp32, tmp_path, method, weights, params
):
    base, branches = fp32
    report = merge_checkpoints(
        branches,
        tmp_path / "m",
        method=method,
        weights=weights,
        base=base,
        params=params,
        progress=False,
    )
    sds, sd0, out = [_load(b) for b in branches], _load(base), _load(tmp_path / "m")
    assert out.keys() == sd0.keys()
    n_base = n_all = 0
    for n in sd0:
        ts = [sd[n] for sd in sds]
        if method == "ties":
            want = _ties_reference(ts, weights, sd0[n], params["density"], params["lambda"])
        else:
            want = _task_arithmetic_reference(ts, weights, sd0[n], params["lambda"])
        assert out[n].dtype == torch.float32
        torch.testing.assert_close(out[n].double(), want, rtol=1e-6, atol=1e-8, msg=n)
        n_base, n_all = n_base + int((out[n] == sd0[n]).sum()), n_all + out[n].numel()
    if method == "ties":  # where every task vector was trimmed (≈ 0.5³ of entries), θ0 stays
        assert 0.08 < n_base / n_all < 0.17
    cfg = yaml.safe_load((tmp_path / "m" / "mergekit.yaml").read_text())
    manifest = json.loads((tmp_path / "m" / "merge_manifest.json").read_text())
    assert manifest["mergekit_export"] == "mergekit.yaml"  # a text model's merge keeps it
    assert cfg["merge_method"] == method and cfg["base_model"] == str(base.resolve())
    assert cfg["parameters"] == {"lambda": params["lambda"], "normalize": method == "ties"}
    assert [m["parameters"]["weight"] for m in cfg["models"]] == weights
    assert report.params["lambda"] == params["lambda"]
    if method == "ties":
        assert all(m["parameters"]["density"] == 0.5 for m in cfg["models"])


# ------------------------------------------------------------- against mergekit itself (optional)
MERGEKIT = mergekit_yaml()
MERGEKIT_CASES = {
    "linear-fp32": ("fp32", "linear", WEIGHTS, {}),
    "task_arithmetic-fp32": ("fp32", "task_arithmetic", [0.6, 0.3, 1.7], {"lambda": 0.7}),
    "ties-fp32": ("fp32", "ties", [1.0, 0.6, 0.3], {"density": 0.5, "lambda": 0.8}),
    "ties-bf16": ("bf16", "ties", [1.0, 0.6, 0.3], {"density": 0.5, "lambda": 0.8}),
}


def _at_tied_cutoff(ts, b, density) -> torch.Tensor:
    """Entries whose |δ_k| equals δ_k's trim cutoff while the cutoff is tied, for some k."""
    mask = torch.zeros(b.numel(), dtype=torch.bool)
    for t in ts:
        m = (t.float() - b.float()).abs().flatten()
        k = int(density * m.numel())
        mags = m.sort(descending=True).values
        if k < m.numel() and mags[k - 1] == mags[k]:
            mask |= m == mags[k - 1]
    return mask.view(b.shape)


@pytest.mark.slow
@pytest.mark.skipif(
    MERGEKIT is None,
    reason="no .bench/mergekit-venv (mergekit 0.1.5 beside torch 2.13.0 CPU, from PyPI): "
    "`python -m benchmarks.bench_merge` builds it once; CI does not",
)
@pytest.mark.parametrize("case", list(MERGEKIT_CASES))
def test_mergekit_cli_gives_our_merge(fp32, bf16, tmp_path, case):
    """mergekit-yaml on the mergekit.yaml our merge writes gives our tensors (max diff printed).

    fp32: equal to within float32 rounding (TA by an ulp here and there: mergekit multiplies
    each δ by its weight and sums the stack, we accumulate ``add_(δ, alpha=w)``). bf16 TIES:
    bit-identical except where a task vector's magnitudes tie at its trim cutoff, where the two
    keep different (equally valid) entries."""
    dtype, method, weights, params = MERGEKIT_CASES[case]
    base, branches = {"fp32": fp32, "bf16": bf16}[dtype]
    ours, theirs = tmp_path / "ours", tmp_path / "mergekit"
    merge_checkpoints(
        branches, ours, method=method, weights=weights, base=base, params=params, progress=False
    )
    cmd = [
        str(MERGEKIT),
        str(ours / "mergekit.yaml"),
        str(theirs),
        "--no-cuda",
        "--no-copy-tokenizer",
        "--no-write-model-card",
        "--quiet",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = _load(ours), _load(theirs)
    assert a.keys() == b.keys()
    sd0, sds = _load(base), [_load(br) for br in branches]
    max_abs = max_rel = 0.0
    n_diff = n_tied = n_all = 0
    for n in a:
        assert a[n].dtype == b[n].dtype == sd0[n].dtype, n
        diff = (a[n].double() - b[n].double()).abs()
        max_abs = max(max_abs, diff.max().item())
        max_rel = max(max_rel, diff.max().item() / a[n].double().abs().max().item())
        n_diff, n_all = n_diff + int((diff > 0).sum()), n_all + diff.numel()
        if dtype == "fp32":
            torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-8, msg=n)
            continue
        tied = _at_tied_cutoff([sd[n] for sd in sds], sd0[n], params["density"])
        n_tied += int((tied & (diff > 0)).sum())
        torch.testing.assert_close(a[n][~tied], b[n][~tied], rtol=0, atol=0, msg=n)
    print(
        f"\n[mergekit 0.1.5 vs ours] {case}: max |diff| {max_abs:.3g} (relative to the "
        f"tensor's max |value| {max_rel:.3g}); {n_diff}/{n_all} entries differ"
        + (f", all {n_tied} at a tied trim cutoff" if dtype == "bf16" else "")
    )
    if method == "linear":
        assert n_diff == 0  # the same float32 accumulation order: bit-identical
    if dtype == "bf16":
        assert n_diff == n_tied and n_diff < 0.01 * n_all


# ----------------------------------------------------------------------- artifacts and manifest
def test_manifest_index_and_mergekit_yaml(fp32, tmp_path):
    base, branches = fp32
    report = merge_checkpoints(
        branches, tmp_path / "m", weights=WEIGHTS, base=base, shard_size=SHARD, progress=False
    )
    out = tmp_path / "m"
    man = json.loads((out / "merge_manifest.json").read_text())
    assert list(man)[:2] == ["format", "version"]
    assert (man["format"], man["version"]) == ("merit-lab/merge-manifest", 1)
    assert load_merge_manifest(out) == {k: v for k, v in man.items() if k not in HEADER}
    assert man["method"] == "linear" and man["weights"] == WEIGHTS
    assert man["base_fingerprint"] == fingerprint_checkpoint(base) == report.base_fingerprint
    for entry, folder in zip([*man["inputs"], man["base"]], [*branches, base], strict=True):
        assert entry["path"] == str(folder.resolve())
        algo = "sha256" if folder == base else "xxh3_128"  # θ0: its fingerprint's sha256
        files = folder.glob("*.safetensors")
        assert entry["files"] == {p.name: file_digest(p, algo) for p in files}
    on_disk = {p.name for p in out.iterdir()} - {"merge_manifest.json"}
    assert set(man["output"]["files"]) == on_disk == set(report.output_sha256)
    assert all(file_digest(out / n) == h for n, h in man["output"]["files"].items())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = _load(out)
    assert index["weight_map"].keys() == tensors.keys()
    for key, shard in index["weight_map"].items():
        assert key in load_file(out / shard)
    for shard in set(index["weight_map"].values()):  # header padded to 8 bytes, as the format asks
        assert int.from_bytes((out / shard).read_bytes()[:8], "little") % 8 == 0
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in tensors.values())
    assert (out / "chat_template.jinja").read_text() == "BASE TEMPLATE"  # side files from θ0
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    cfg = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert cfg["merge_method"] == "linear" and cfg["out_dtype"] == "float32"
    assert [m["model"] for m in cfg["models"]] == [str(b.resolve()) for b in branches]
    assert [m["parameters"]["weight"] for m in cfg["models"]] == WEIGHTS


def test_manifest_of_another_format_or_newer_version_is_refused_and_a_legacy_one_read(tmp_path):
    """`load_merge_manifest` (a merged folder, or the file): a newer version or another format is
    refused naming the file; a manifest from before the envelope (no header) reads as v1."""
    doc = {"method": "linear", "weights": [0.25, 0.75], "params": {}}
    path = save_merge_manifest(tmp_path, doc)
    assert path == tmp_path / "merge_manifest.json"
    header = {"format": "merit-lab/merge-manifest", "version": 1}
    assert json.loads(path.read_text()) == {**header, **doc}
    assert load_merge_manifest(tmp_path) == load_merge_manifest(path) == doc
    cases = [
        ({**header, "version": 2, **doc}, "merit-lab/merge-manifest version 2 is not one"),
        ({**doc, "format": "merit-lab/partition", "version": 1}, "holds 'merit-lab/partition'"),
    ]
    for bad, match in cases:
        path.write_text(json.dumps(bad))
        with pytest.raises(EnvelopeError, match="merge_manifest.json: .*" + match):
            load_merge_manifest(tmp_path)
    path.write_text(json.dumps(doc))
    assert load_merge_manifest(tmp_path) == doc


def test_overwrite_replaces_an_existing_merge(fp32, tmp_path):
    _, branches = fp32
    merge_checkpoints(branches, tmp_path / "m", method="uniform", progress=False)
    merge_checkpoints(branches, tmp_path / "m", weights=WEIGHTS, overwrite=True, progress=False)
    assert json.loads((tmp_path / "m" / "merge_manifest.json").read_text())["method"] == "linear"


def test_fingerprint_tracks_file_contents(fp32, tmp_path):
    base, _ = fp32
    shutil.copytree(base, tmp_path / "copy")
    assert fingerprint_checkpoint(tmp_path / "copy") == fingerprint_checkpoint(base)
    shard = next((tmp_path / "copy").glob("*.safetensors"))
    sd = load_file(shard)
    next(iter(sd.values()))[0] += 1
    save_file(sd, shard, metadata={"format": "pt"})
    assert fingerprint_checkpoint(tmp_path / "copy") != fingerprint_checkpoint(base)


# ------------------------------------------------------------------------------------ refusals
def _variant(src: Path, dst: Path, edit) -> Path:
    """A one-file copy of checkpoint ``src`` whose state dict went through ``edit``."""
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    sd = _load(src)
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _with_fingerprint(src: Path, dst: Path, fp: str) -> Path:
    shutil.copytree(src, dst)
    (dst / "merit_branch.json").write_text(json.dumps({"base_fingerprint": fp}))
    return dst


def _nan(sd):
    sd["model.norm.weight"][3] = float("nan")


def _shift(sd):
    sd["model.norm.weight"] += 1e-3


REFUSALS = {
    "missing key": (
        lambda t, b, bs, bf: dict(
            inputs=[bs[0], _variant(bs[1], t / "v", lambda sd: sd.pop("lm_head.weight"))]
        ),
        r"missing \['lm_head.weight'\]",
    ),
    "shape": (
        lambda t, b, bs, bf: dict(
            inputs=[
                bs[0],
                _variant(
                    bs[1],
                    t / "v",
                    lambda sd: sd.update({"model.norm.weight": sd["model.norm.weight"][:16]}),
                ),
            ]
        ),
        r"'model.norm.weight' is F32\[32\] in .*b0 but F32\[16\] in .*v",
    ),
    "dtype": (lambda t, b, bs, bf: dict(inputs=[bs[0], bf[1][1]]), r"is F32\[.* but BF16\["),
    "nan in input": (
        lambda t, b, bs, bf: dict(inputs=[bs[0], _variant(bs[1], t / "v", _nan)]),
        r"'model.norm.weight' has non-finite values in .*v",
    ),
    "non-finite result": (
        lambda t, b, bs, bf: dict(
            inputs=bs, base=b, method="task_arithmetic", params={"lambda": 1e300}
        ),
        r"task_arithmetic .*lambda.* gave non-finite values in 'model",
    ),
    "negative weight": (lambda t, b, bs, bf: dict(inputs=bs, weights=[1.2, -0.1, -0.1]), ">= 0"),
    "sum != 1": (lambda t, b, bs, bf: dict(inputs=bs, weights=[0.5, 0.3, 0.3]), "summing to 1"),
    "weight count": (lambda t, b, bs, bf: dict(inputs=bs, weights=[0.5, 0.5]), "2 weights for 3"),
    "uniform weights": (
        lambda t, b, bs, bf: dict(inputs=bs, method="uniform", weights=WEIGHTS),
        "takes no weights",
    ),
    "unknown method": (lambda t, b, bs, bf: dict(inputs=bs, method="slerp"), "unknown merge"),
    "unknown param": (
        lambda t, b, bs, bf: dict(inputs=bs, base=b, method="ties", params={"k": 0.2}),
        r"not \['k'\]",
    ),
    "density range": (
        lambda t, b, bs, bf: dict(inputs=bs, base=b, method="ties", params={"density": 0}),
        r"density must be in \(0, 1\]",
    ),
    "ties no base": (lambda t, b, bs, bf: dict(inputs=bs, method="ties"), "needs base="),
    "task arithmetic no base": (
        lambda t, b, bs, bf: dict(inputs=bs, method="task_arithmetic"),
        "needs base=",
    ),
    "other base": (
        lambda t, b, bs, bf: dict(inputs=bs, base=_variant(b, t / "b", _shift)),
        "different base: its merit_branch.json records",
    ),
    "branches disagree": (
        lambda t, b, bs, bf: dict(inputs=[bs[0], _with_fingerprint(bs[1], t / "v", "0" * 64)]),
        "branches trained from different bases",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_leave_nothing_behind(fp32, bf16, tmp_path, case):
    build, match = REFUSALS[case]
    kwargs = build(tmp_path, fp32[0], fp32[1], bf16)
    inputs = kwargs.pop("inputs")
    with pytest.raises(ValueError, match=match):
        merge_checkpoints(inputs, tmp_path / "out", progress=False, **kwargs)
    _no_trace(tmp_path / "out")


def test_refuses_an_existing_out_dir_and_leaves_it_alone(fp32, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        merge_checkpoints(fp32[1], tmp_path / "out", progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".out.*"))
