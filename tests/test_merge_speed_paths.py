"""Tests for merit_lab.merging.engine and merit_lab.merging.digests: the merge in pieces, read
ahead on threads, gives the bits of the straightforward tensor-at-a-time merge; digests taken
while reading equal whole-file digests; sha256 digests of old manifests are still checked."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from merit_lab.io import sha256_file
from merit_lab.merging.digests import (
    digest_algorithm,
    file_digest,
    format_digest,
    verify_digest,
    verify_merge_files,
)
from merit_lab.merging.engine import merge_into
from merit_lab.merging.methods import MERGE_METHODS
from merit_lab.merging.stream import load_merge_manifest, merge_checkpoints
from merit_lab.models.checkpoints import Checkpoint, write_shards

WEIGHTS = [0.5, 0.3, 0.2]
SHARD = 6_000  # bytes: several shards (a tensor never spans two)


def _family(root: Path, dtype: torch.dtype) -> tuple[Path, list[Path]]:
    """θ0 and 3 branches θ0 + 0.01·N(0, 1); hidden 24 and vocab 37, so that no tensor is a
    multiple of the piece sizes the tests use."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=37,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(root / "base")
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    for k in range(3):
        gen = torch.Generator().manual_seed(10 + k)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(theta0[name] + 0.01 * torch.randn(p.shape, generator=gen).to(dtype))
        model.save_pretrained(root / f"b{k}", max_shard_size="20KB")
    return root / "base", [root / f"b{k}" for k in range(3)]


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def family(request, tmp_path_factory):
    return _family(tmp_path_factory.mktemp(str(request.param)[6:]), request.param)


def _straightforward(out: Path, branches, base, method: str, weights, params) -> None:
    """The merge as it was written before the engine: whole tensors through `Checkpoint.read`,
    the method, ``.to(dtype)``, `write_shards`."""
    ckpts = [Checkpoint.open(b) for b in branches]
    base_ckpt = Checkpoint.open(base)
    spec = MERGE_METHODS[method]
    kwargs = {("lambda_" if k == "lambda" else k): v for k, v in params.items()}

    def produce(key):
        ts = [c.read(key) for c in ckpts]
        b = base_ckpt.read(key).float() if spec.needs_base else None
        return spec.fn([t.float() for t in ts], weights, b, **kwargs).to(ts[0].dtype)

    out.mkdir()
    with ThreadPoolExecutor(1) as pool:
        write_shards(out, ckpts[0], produce, shard_size=SHARD, hasher=pool)


def _files(folder: Path) -> dict[str, bytes]:
    names = [*folder.glob("*.safetensors"), *folder.glob("*.index.json")]
    return {p.name: p.read_bytes() for p in names}


CASES = {
    "linear": ("linear", WEIGHTS, {}),
    "task_arithmetic": ("task_arithmetic", [0.7, -0.4, 1.3], {"lambda": 0.8}),
    "ties": ("ties", [1.0, 0.5, 0.25], {"density": 0.4, "lambda": 1.0}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pieces_and_read_ahead_give_the_bits_of_the_straightforward_merge(family, tmp_path, case):
    base, branches = family
    method, weights, params = CASES[case]
    _straightforward(tmp_path / "ref", branches, base, method, weights, params)
    ref = _files(tmp_path / "ref")
    assert len(ref) == 1 + sum(n.endswith(".safetensors") for n in ref) > 3  # shards + index
    ckpts = [Checkpoint.open(b) for b in branches]
    spec = MERGE_METHODS[method]
    # pieces of 61 and 500 entries (no tensor's multiple), 4096 (more than any tensor), whole;
    # read ahead by 0 (one after another), 1 (the default) and 3
    for piece, depth in [(61, 0), (61, 1), (61, 3), (500, 1), (4096, 1), (None, None)]:
        out = tmp_path / f"p{piece}-d{depth}"
        out.mkdir()
        digests, _ = merge_into(
            out,
            ckpts,
            Checkpoint.open(base),
            spec,
            weights,
            params,
            digest="sha256",
            shard_size=SHARD,
            piece=piece,
            depth=depth,
        )
        assert _files(out) == ref, (piece, depth)
        assert digests == {n: sha256_file(out / n) for n in ref if n.endswith(".safetensors")}


def test_digests_while_reading_equal_whole_file_digests_in_any_layout(family, tmp_path):
    """Inputs saved alike are digested from the merge's own reads; one saved in another layout
    (one file, other tensor order) or with a stray extra file gets the rest read at the end."""
    _, branches = family
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(branches[1] / "config.json", odd)
    sd = {}
    for f in sorted(branches[1].glob("*.safetensors")):
        sd.update(load_file(f))
    save_file(dict(reversed(list(sd.items()))), odd / "model.safetensors", {"format": "pt"})
    stray = tmp_path / "stray"
    shutil.copytree(branches[2], stray)
    save_file({"x": torch.ones(3)}, stray / "extra.safetensors")
    inputs = [branches[0], odd, stray]
    reports = {}
    for algo in ("xxh3_128", "sha256"):
        report = reports[algo] = merge_checkpoints(
            inputs, tmp_path / algo, weights=WEIGHTS, digest=algo, progress=False, piece=5
        )
        for folder, got in zip(inputs, report.input_sha256, strict=True):
            want = {p.name: file_digest(p, algo) for p in folder.glob("*.safetensors")}
            assert dict(got) == want
        assert "extra.safetensors" in report.input_sha256[2]
    # the same bits whatever the layout of the inputs
    assert _files(tmp_path / "sha256").keys() == _files(tmp_path / "xxh3_128").keys()
    same = merge_checkpoints(branches, tmp_path / "alike", weights=WEIGHTS, progress=False)
    for name, data in _files(tmp_path / "sha256").items():
        assert (tmp_path / "alike" / name).read_bytes() == data
    assert same.input_sha256[0] == reports["xxh3_128"].input_sha256[0]


def test_old_sha256_digests_still_check_and_changes_are_found_under_both(family, tmp_path):
    _, branches = family
    for algo in ("sha256", "xxh3_128"):
        out = tmp_path / algo
        merge_checkpoints(branches, out, weights=WEIGHTS, digest=algo, progress=False)
        manifest = load_merge_manifest(out)
        files = manifest["output"]["files"]
        shards = sorted(n for n in files if n.endswith(".safetensors"))
        assert {digest_algorithm(d) for d in files.values()} == {algo}
        if algo == "sha256":  # the old format: bare hex, what sha256sum prints
            assert all(files[n] == sha256_file(out / n) for n in files)
        else:
            assert all(d.startswith("xxh3_128:") and len(d) == 9 + 32 for d in files.values())
        assert verify_merge_files(out, manifest) == []
        data = bytearray((out / shards[0]).read_bytes())
        data[-1] ^= 1  # one bit of the last tensor
        (out / shards[0]).write_bytes(bytes(data))
        (out / "config.json").unlink()
        assert sorted(verify_merge_files(out, manifest)) == ["config.json", shards[0]]
    # a manifest written before digests were tagged: every digest is sha256_file's hex
    legacy = {p.name: sha256_file(p) for p in branches[0].glob("*.safetensors")}
    assert all(verify_digest(branches[0] / n, d) for n, d in legacy.items())
    name, digest = next(iter(legacy.items()))
    assert not verify_digest(branches[1] / name, digest)  # another branch's file: detected


def test_digest_strings_name_their_algorithm():
    assert format_digest("sha256", "ab" * 32) == "ab" * 32
    assert digest_algorithm("ab" * 32) == "sha256"
    assert digest_algorithm(format_digest("xxh3_128", "0f" * 16)) == "xxh3_128"
    for bad in ["ab" * 31, "md5:" + "0" * 32, "sha256:" + "ab" * 32, "XXH3_128:00", ""]:
        with pytest.raises(ValueError, match="is not a file digest"):
            digest_algorithm(bad)
    with pytest.raises(ValueError, match="unknown digest 'md5'"):
        merge_checkpoints([Path("/nonexistent")], Path("/nonexistent-out"), digest="md5")


def _nan_at(src: Path, dst: Path, key: str) -> Path:
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        sd = load_file(f)
        if key in sd:
            sd[key].view(-1)[5] = float("nan")
            save_file(sd, f, {"format": "pt"})
    return dst


def test_a_nan_in_an_input_is_found_through_the_output_even_at_weight_zero(family, tmp_path):
    """Elementwise methods check the merged piece, and on a NaN there blame the input that has
    one: 0·NaN is NaN, so a branch with weight 0 is refused too, naming it."""
    base, branches = family
    key = "model.layers.1.mlp.down_proj.weight"
    bad = _nan_at(branches[2], tmp_path / "bad", key)
    for weights in ([0.5, 0.5, 0.0], WEIGHTS):
        with pytest.raises(ValueError, match=rf"'{key}' has non-finite values in .*bad"):
            merge_checkpoints([*branches[:2], bad], tmp_path / "out", weights=weights, piece=64)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    bad_base = _nan_at(base, tmp_path / "bad-base", key)
    with pytest.raises(ValueError, match=rf"'{key}' has non-finite values in .*bad-base"):
        merge_checkpoints(branches, tmp_path / "out", method="task_arithmetic", base=bad_base)


def test_integer_tensors_are_kept_when_equal_and_refused_when_not(tmp_path):
    def save(name: str, idx: torch.Tensor, w: float) -> Path:
        (tmp_path / name).mkdir()
        tensors = {"idx": idx, "w": torch.full((10,), w), "flag": torch.tensor([True, False])}
        save_file(tensors, tmp_path / name / "model.safetensors", {"format": "pt"})
        return tmp_path / name

    idx = torch.arange(1000, dtype=torch.int64)
    a, b = save("a", idx, 1.0), save("b", idx.clone(), 3.0)
    merge_checkpoints([a, b], tmp_path / "m", piece=3, progress=False)
    got = load_file(tmp_path / "m" / "model.safetensors")
    assert torch.equal(got["idx"], idx) and torch.equal(got["flag"], torch.tensor([True, False]))
    assert torch.equal(got["w"], torch.full((10,), 2.0))
    c = save("c", torch.cat([idx[:-1], torch.tensor([7])]), 1.0)
    with pytest.raises(ValueError, match="non-float tensor 'idx' differs between inputs"):
        merge_checkpoints([a, c], tmp_path / "m2", piece=3, progress=False)
    assert json.loads((tmp_path / "m" / "merge_manifest.json").read_text())["weights"] == [0.5] * 2


def test_a_changed_input_changes_exactly_its_file_s_digest_under_both(family, tmp_path):
    _, branches = family
    changed = tmp_path / "b1"
    shutil.copytree(branches[1], changed)
    shard = sorted(changed.glob("*.safetensors"))[-1]
    sd = load_file(shard)
    key = next(iter(sd))
    sd[key].view(-1)[0] += 1
    save_file(sd, shard, {"format": "pt"})
    for algo in ("sha256", "xxh3_128"):
        runs = [
            merge_checkpoints(
                [branches[0], b, branches[2]], tmp_path / f"{algo}-{i}", digest=algo, piece=97
            )
            for i, b in enumerate([branches[1], changed])
        ]
        a, b = (r.input_sha256[1] for r in runs)
        assert a.keys() == b.keys()
        assert [n for n in a if a[n] != b[n]] == [shard.name]
        assert runs[0].input_sha256[0] == runs[1].input_sha256[0]
        assert (
            b[shard.name] == file_digest(shard, algo) != file_digest(branches[1] / shard.name, algo)
        )
