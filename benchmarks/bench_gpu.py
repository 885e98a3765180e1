"""GPU benchmark: the gradient stage and the merge on ~0.5B and ~1.5B Qwen2-style models.

Everything is built here, nothing is downloaded: Qwen2.5-0.5B's and -1.5B's shapes from a
`Qwen2Config` (random init, seeded, bf16 on the card), a word-level tokenizer over the same
151,936 ids with a ChatML template, and a synthetic mixture of 4 sources x 200 prompt + response
examples of 256-512 tokens (n = 200: the stage's default, so the sketch runs once per 200
examples as it does in a run). On whatever card is present it measures, each over ≥ 3 timed
rounds after a warm-up (median, min-max), alternating the sides so drift hits both:

* **plain fwd+bwd** tokens/s (the model's own loss, ``loss.backward()``) over the stage's own
  micro-batches: the ceiling;
* **gradient stage** tokens/s: ``estimate_gradients`` (tokenising, mean response-token loss per
  source, backward, count-sketch of every parameter into one 2^18 float32 row), and the ratio;
* **sketch share**: the sketch step alone (``GradientSketch.add_`` over every parameter's
  gradient, synchronised) times the number of times a round runs it, over the round's seconds;
* **peak GPU memory** of each phase (``max_memory_allocated``, reset before each);
* the same in float32 for the 0.5B, one source (a bf16 model's micro-batch gradients are summed
  in ``.grad`` and sketched once into the float32 row, as for float32);
* **merge against the disk**: ``merge_checkpoints`` (linear, K = 2 bf16 branches, θ0 plus seeded
  noise, saved by ``save_pretrained``) against plain reads of the inputs plus a write of the
  output's bytes with fsync (``bench_merge.disk_limit``), warm page cache, as ``make bench``;
* **bergson side by side** (`benchmarks.bench_bergson`): its gradient-store build against our
  stage in alternating rounds, on the same examples and width (bergson in its own venv, which
  on a card sees this python's CUDA torch, pinned): tokens/s, peak GPU memory and the cosine
  agreement of the two banks, beside the ahead-of-bergson targets;
* multi-GPU scaling of the sharded stage, only with ≥ 2 GPUs and a worker API.

Bergson's ≈ 28k tokens/s (its gradient store, Pythia-1B, one GH200) is printed beside ours as
the anchor; it is another model and another card. ``--tiny`` runs the same code on a ~1M-
parameter config (under a minute on a CPU) so the tests can exercise it; it sets no targets.

Run: python -m benchmarks.bench_gpu [--sizes 0.5b,1.5b] [--out PATH] [--tiny] [--device cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import bench_conflict
from benchmarks.bench_bergson import add_comparison_figures
from benchmarks.bench_merge import disk_limit, serial_hash_seconds
from benchmarks.common import (
    Results,
    machine,
    peak_rss,
    print_table,
    reset_peak_rss,
    write_json,
)
from merit_lab.data.formatting import collate, tokenize_examples
from merit_lab.data.mixture import Mixture, Source
from merit_lab.gradients.batching import micro_batches
from merit_lab.gradients.estimate import estimate_gradients, source_gradient
from merit_lab.gradients.sketch import SketchSpec, build_sketch
from merit_lab.merging.stream import merge_checkpoints
from merit_lab.models.loading import select_parameters

ROOT = Path(__file__).resolve().parent.parent
QWEN = {
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
}
# Model shapes (Qwen2.5's) and the workload of each: T sources x n examples of lengths in
# `lengths` tokens; micro-batches of `micro_tokens` padded tokens; fp32: sources measured again
# in float32.
SIZES: dict[str, dict[str, Any]] = {
    "0.5b": {
        "model": QWEN
        | {
            "hidden_size": 896,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "intermediate_size": 4864,
        },
        "sources": 4,
        "n": 200,
        "lengths": (256, 512),
        "max_length": 512,
        "micro_batch": 16,
        "micro_tokens": 8192,
        "fp32_sources": 1,
    },
    "1.5b": {
        "model": QWEN
        | {
            "hidden_size": 1536,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "intermediate_size": 8960,
        },
        "sources": 4,
        "n": 200,
        "lengths": (256, 512),
        "max_length": 512,
        "micro_batch": 16,
        "micro_tokens": 8192,
        "fp32_sources": 0,
    },
    "tiny": {
        "model": {
            "vocab_size": 8192,
            "tie_word_embeddings": True,
            "max_position_embeddings": 1024,
            "hidden_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 256,
        },
        "sources": 2,
        "n": 4,
        "lengths": (24, 48),
        "max_length": 64,
        "micro_batch": 2,
        "micro_tokens": 128,
        "fp32_sources": 2,
    },
}
ANCHOR = {
    "name": "bergson",
    "tokens_per_s": 28000.0,
    "setup": "gradient store of Pythia-1B on one GH200 (bergson's own figure)",
    "note": "not our setup: another model (Pythia-1B) and another card (GH200); for scale only",
}
K, NOISE, SEED = 2, 1e-3, 0
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"[bench_gpu {time.perf_counter() - _T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ model, tokenizer, data
def build_tokenizer(vocab_size: int):
    """A word-level tokenizer over ``vocab_size`` ids ("w0", "w1", ... plus ChatML's specials):
    text of random words tokenises to random ids, through the project's own chat-template path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = ["system", "user", "assistant"]
    n_plain = vocab_size - len(specials) - len(words)
    vocab = {f"w{i}": i for i in range(n_plain)}
    vocab |= {w: n_plain + j for j, w in enumerate(words + specials)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML
    return tok


def build_mixture(spec: dict, n_sources: int, seed: int = SEED) -> Mixture:
    """``n_sources`` sources of ``spec['n']`` one-turn examples, total lengths uniform in
    ``spec['lengths']`` tokens (6 of them the template's); the response's share grows from 20%
    (source 0) to 80% (the last), so sources differ in how many tokens carry the loss."""
    n_plain = spec["model"]["vocab_size"] - 6
    lo, hi = spec["lengths"]
    sources = []
    for s in range(n_sources):
        rng = np.random.default_rng([seed, s])
        share = 0.2 + 0.6 * s / max(1, n_sources - 1)
        examples = []
        for i in range(spec["n"]):
            words = int(rng.integers(lo, hi + 1)) - 6
            n_resp = max(1, round(words * share))
            ids = rng.integers(0, n_plain, words)
            user, answer = (" ".join(f"w{j}" for j in part) for part in np.split(ids, [-n_resp]))
            turns = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            examples.append({"id": f"s{s}-{i}", "messages": turns})
        sources.append(Source(f"source{s}", (), tuple(examples), ()))
    return Mixture(tuple(sources), origin="synthetic (benchmarks/bench_gpu.py)", seed=seed)


def build_model(config: dict, dtype: torch.dtype, device: torch.device, seed: int = SEED):
    """A randomly initialised (seeded) Qwen2 causal LM, made directly on ``device``, eval mode."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**config), dtype=dtype)
    return model.eval()


# --------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measured(fn: Callable[[], Any], device: torch.device) -> tuple[float, int | None, Any]:
    """(seconds, peak bytes allocated on the GPU during ``fn`` or None off CUDA, fn's result)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, peak, out


def _summary(seconds: list[float], work: float) -> dict[str, Any]:
    """Median rate and its spread from the timed rounds (``work`` units per round)."""
    med = statistics.median(seconds)
    return {
        "seconds": seconds,
        "median_s": med,
        "rate": work / med,
        "rate_min": work / max(seconds),
        "rate_max": work / min(seconds),
    }


def _peak(values: list[int | None]) -> int | None:
    return None if any(v is None for v in values) else max(values)  # type: ignore[type-var]


def _micro_kwargs(spec: dict) -> dict[str, Any]:
    """The stage's micro-batching: by ``micro_tokens`` padded tokens (``micro_batch_size``
    applies only without them)."""
    return {"micro_batch_size": spec["micro_batch"], "micro_batch_tokens": spec["micro_tokens"]}


def _split(examples: list, kw: dict[str, Any]) -> list[list]:
    """The stage's own micro-batches of one source's examples (`batching.micro_batches`)."""
    return micro_batches(examples, size=kw["micro_batch_size"], tokens=kw["micro_batch_tokens"])


def _plain_fwd_bwd(model, batches: list[dict], device: torch.device) -> None:
    """A plain training forward+backward (the model's own loss) over ``batches``."""
    for b in batches:
        model(**{k: v.to(device) for k, v in b.items()}).loss.backward()
    model.zero_grad(set_to_none=True)


def _sketch_step(model, tok, mix: Mixture, spec: dict, kw: dict, device, rounds: int) -> dict:
    """The sketch step alone, as the stage runs it after a backward: ``add_`` of every
    parameter's gradient into a fresh float32 row (the exact norm too for a float32 model)."""
    selected = select_parameters(model)
    sk = build_sketch(SketchSpec(), [(n, tuple(p.shape)) for n, p in selected], device=device)
    examples = tokenize_examples(tok, mix.sources[0].calibration, spec["max_length"])
    first = _split(examples, kw)[0]
    model.zero_grad(set_to_none=True)
    source_gradient(model, first, pad_token_id=tok.pad_token_id, **kw)

    def step() -> None:
        row = sk.zeros()
        sq = torch.zeros((), dtype=torch.float64, device=device)
        for name, p in selected:
            sk.add_(row, name, p.grad)
            sq += torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64).square()

    runs = [_measured(step, device) for _ in range(1 + rounds)][1:]  # the first warms up
    model.zero_grad(set_to_none=True)
    return {
        "seconds": [r[0] for r in runs],
        "median_s": statistics.median(r[0] for r in runs),
        "peak_bytes": _peak([r[1] for r in runs]),
    }


def measure_gradients(model, tok, mix: Mixture, spec: dict, device, rounds: int) -> dict:
    """Plain fwd+bwd vs ``estimate_gradients`` on the same micro-batches, and the sketch step."""
    kw = _micro_kwargs(spec)
    ml = spec["max_length"]
    per_source = [_split(tokenize_examples(tok, s.calibration, ml), kw) for s in mix]
    batches = [collate(b, tok.pad_token_id) for mbs in per_source for b in mbs]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    n = spec["n"]

    def stage():
        return estimate_gradients(model, tok, mix, n=n, max_length=ml, progress=False, **kw)

    _log(f"  warm-up ({len(mix)} sources, {len(batches)} micro-batches, {tokens:,} tokens)")
    # One whole pass of each: every batch shape's kernels are chosen before the timed rounds
    # (a partial warm-up left the first timed plain pass 2x slow on an H100).
    _measured(lambda: _plain_fwd_bwd(model, batches, device), device)
    _measured(stage, device)
    plain, staged = [], []
    for r in range(rounds):
        plain.append(_measured(lambda: _plain_fwd_bwd(model, batches, device), device))
        staged.append(_measured(stage, device))
        _log(f"  round {r + 1}/{rounds}: plain {plain[-1][0]:.2f} s, stage {staged[-1][0]:.2f} s")
    bank = staged[-1][2]
    stage_tokens = sum(int(st.get("n_tokens", 0)) for st in bank.stats.values())
    # every source is sketched once, after its micro-batches are summed in .grad
    drains = len(mix)
    sk = _sketch_step(model, tok, mix, spec, kw, device, rounds)
    p, s = _summary([x[0] for x in plain], tokens), _summary([x[0] for x in staged], tokens)
    return {
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "sources": len(mix),
        "examples_per_source": n,
        "micro_batches": len(batches),
        "micro_batching": {k.removeprefix("micro_batch_"): v for k, v in kw.items()},
        "tokens": tokens,
        "stage_tokens_counted_by_stage": stage_tokens or None,
        "plain": p,
        "stage": s,
        "ratio": s["rate"] / p["rate"],
        "ratio_per_round": [a[0] / b[0] for a, b in zip(plain, staged, strict=True)],
        "sketch_runs_per_round": drains,
        "sketch_step": sk,
        "sketch_share": drains * sk["median_s"] / s["median_s"],
        "sketch_s_per_round": drains * sk["median_s"],
        "gap_s": s["median_s"] - p["median_s"],
        "peak_bytes": {
            "plain": _peak([x[1] for x in plain]),
            "stage": _peak([x[1] for x in staged]),
            "sketch": sk["peak_bytes"],
        },
        "loss_mean": float(np.mean([st["loss"] for st in bank.stats.values()])),
    }


def measure_bergson(model, tok, mix: Mixture, spec: dict, device, rounds: int, work: Path):
    """Bergson's gradient-store build (`benchmarks.bench_bergson`, its own venv and process)
    against our stage in the same rounds, who goes first alternating, on the same examples and
    width; the cosine agreement of the two banks (ours again over bergson's modules, untimed).
    On a card bergson's venv sees this python's CUDA torch (``--system-site-packages``, torch
    pinned). Returns a sentence instead where bergson's venv is missing (``--tiny`` never
    installs it)."""
    from benchmarks import bench_bergson as bg

    tiny = bool(spec.get("tiny"))
    if device.type == "cuda":
        pin = f"torch=={torch.__version__.split('+')[0]}"
        kw = {"base_python": sys.executable, "torch_spec": pin, "system_site": True}
        exe, how = bg.ensure_bergson(not tiny, bg.BENCH_DIR / "bergson-venv-cuda", **kw)
    else:
        exe, how = bg.ensure_bergson(not tiny)
    if exe is None:
        return f"bergson not measured: {how}"
    folder = work / "bergson"
    model.save_pretrained(folder / "model")
    job = bg.bergson_job(
        model,
        tok,
        mix,
        n=spec["n"],
        max_length=spec["max_length"],
        token_batch_size=spec["micro_tokens"],
        model_path=str(folder / "model"),
        precision="bf16" if next(model.parameters()).dtype == torch.bfloat16 else "fp32",
    )
    kw, last = _micro_kwargs(spec), {}

    def ours() -> dict:
        def stage():
            return estimate_gradients(
                model, tok, mix, n=spec["n"], max_length=spec["max_length"], progress=False, **kw
            )

        base = reset_peak_rss()
        seconds, peak, bank = _measured(stage, device)
        last["ours"] = bank.rows
        return {"seconds": seconds, "peak_bytes": peak if peak is not None else peak_rss() - base}

    def bergson() -> dict:
        report, last["bergson"] = bg.run_bergson(exe, job, folder / "run")
        return report

    runs = bg.alternate(rounds, ours, bergson)
    tokens = sum(map(len, job["input_ids"]))
    cmp = bg.summarize_rounds(runs, tokens, f"{len(mix)} sources x {spec['n']} examples", job)
    names = bg.bergson_targets(model)
    ml = spec["max_length"]
    same = estimate_gradients(
        model, tok, mix, n=spec["n"], max_length=ml, include=names, progress=False, **kw
    ).rows
    c_berg = bg.cosine_matrix(last["bergson"])
    cmp["agreement"] = {
        "ours_vs_bergson": bg.cosine_agreement(bg.cosine_matrix(same), c_berg),
        "ours_all_vs_bergson": bg.cosine_agreement(bg.cosine_matrix(last["ours"]), c_berg),
    }
    cmp["exact_skipped"] = "not computed on the GPU shapes (full gradients of every source)"
    shutil.rmtree(folder, ignore_errors=True)
    return cmp


def _fsync_folder(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def measure_merge(model, work: Path, device, rounds: int) -> dict:
    """``merge_checkpoints`` (linear, K bf16 branches θ0 + seeded noise) vs the disk's floor."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    branches = [work / f"branch{k}" for k in range(K)]
    params = list(model.parameters())
    theta0 = [p.detach().clone() for p in params]
    gen = torch.Generator(device=device).manual_seed(1000)
    _log(f"  writing {K} branch checkpoints under {work}")
    with torch.no_grad():
        for b in branches:
            for p, p0 in zip(params, theta0, strict=True):
                noise = torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype)
                p.copy_(p0).add_(noise, alpha=NOISE)
            model.save_pretrained(b)
            _fsync_folder(b)  # no writeback left to run during the timings
        for p, p0 in zip(params, theta0, strict=True):
            p.copy_(p0)
    del theta0
    files = [f for b in branches for f in sorted(b.glob("*.safetensors"))]
    out = work / "merged"

    def merge():
        return merge_checkpoints(
            branches, out, method="linear", weights=[1 / K] * K, overwrite=True, progress=False
        )

    disk_limit(files, work, [])  # warm the page cache, as bench_merge does (untimed)
    merge()  # warm-up
    merges, floors = [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        report = merge()
        merges.append(time.perf_counter() - t0)
        shards = [f.stat().st_size for f in sorted(out.glob("*.safetensors"))]
        lim = disk_limit(files, work, shards)
        floors.append(lim["read_s"] + lim["write_s"])
        _log(f"  merge round {r + 1}/{rounds}: merge {merges[-1]:.2f} s, floor {floors[-1]:.2f} s")
    moved = sum(f.stat().st_size for f in files) + report.bytes_written
    # The merge hashes every byte it reads and writes (on threads beside it): the same hashing
    # in one thread says how much of the gap to the floor that can explain.
    hash_in = serial_hash_seconds(files)
    hash_out = serial_hash_seconds(sorted(out.glob("*.safetensors")))
    shutil.rmtree(work, ignore_errors=True)
    m, f = statistics.median(merges), statistics.median(floors)
    return {
        "k": K,
        "dtype": "bfloat16",
        "bytes_read": moved - report.bytes_written,
        "bytes_written": report.bytes_written,
        "n_tensors": report.n_tensors,
        "merge_s": merges,
        "floor_s": floors,
        "merge_median_s": m,
        "floor_median_s": f,
        "ratio": m / f,
        "merge_gb_per_s": moved / m / 1e9,
        "serial_sha256_inputs_s": hash_in,
        "serial_sha256_output_s": hash_out,
    }


# ------------------------------------------------------------------------------------- stages
def _add_gradient_figures(res: Results, section: str, g: dict, tiny: bool) -> None:
    tgt = (lambda t: None) if tiny else (lambda t: t)
    p, s, sk = g["plain"], g["stage"], g["sketch_step"]
    work = f"{g['tokens']:,} tokens, {g['sources']} sources x {g['examples_per_source']}"
    rounds = f"over {len(p['seconds'])} rounds"
    res.add(
        section,
        "plain fwd+bwd (the ceiling)",
        p["rate"],
        "tok/s",
        note=f"{work}, {g['micro_batches']} micro-batches; "
        f"{p['rate_min']:,.0f}-{p['rate_max']:,.0f} {rounds}",
    )
    res.add(
        section,
        "gradient stage (estimate_gradients)",
        s["rate"],
        "tok/s",
        note=f"{s['rate_min']:,.0f}-{s['rate_max']:,.0f} {rounds}",
    )
    res.add(section, "stage ÷ plain fwd+bwd", g["ratio"], "×", target=tgt((">=", 0.9)))
    res.add(
        section,
        "count-sketch (2^18) share of the stage",
        100 * g["sketch_share"],
        "%",
        target=tgt(("<=", 10.0)),
        note=f"{sk['median_s'] * 1e3:.1f} ms per sketch step x {g['sketch_runs_per_round']} "
        f"per round = {g['sketch_s_per_round']:.2f} s "
        f"of the stage's {g['gap_s']:.2f} s over plain",
    )
    for phase, b in g["peak_bytes"].items():
        if b is not None:  # off CUDA: null in the JSON, no row in the table
            res.add(section, f"peak GPU memory, {phase}", b / 2**30, "GiB")


def measure_scaling(model, tok, mix: Mixture, spec: dict, work: Path, device) -> dict | str:
    """The sharded gradient stage (`merit_lab.gradients.workers`: one local worker process per GPU)
    at 1 worker and at every GPU, wall time from launch to the last part (each worker loads θ0),
    and the two banks compared. ``--tiny`` on the CPU runs it with 1 and 2 CPU processes, so
    the tests exercise the path; with fewer than 2 GPUs it is not measured and says so."""
    from merit_lab.gradients.workers import (
        GradientJob,
        agreed_info,
        assemble_bank,
        job_paths,
        launch_jobs,
        shard_sources,
    )

    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and count < 2:
        return f"not measured: {count} GPU" + ("s" if count != 1 else "")
    if device.type != "cuda" and not spec.get("tiny"):
        return "not measured: no GPUs"
    root = work / "scaling"
    shutil.rmtree(root, ignore_errors=True)
    model.save_pretrained(root / "base")
    # apart from the model: transformers 5 rebuilds a qwen2 model's tokenizer as Qwen2's BPE
    tok.save_pretrained(root / "tokenizer")
    for src in mix:  # the mixture as files: a worker loads it like a run does
        lines = "".join(json.dumps(ex) + "\n" for ex in src.calibration)
        (root / "mix").mkdir(parents=True, exist_ok=True)
        (root / "mix" / f"{src.name}.jsonl").write_text(lines)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    counts = [1, count] if count >= 2 else [1, 2]
    walls, banks, workers = [], [], {}
    for n_workers in counts:
        out = root / f"bank-{n_workers}"
        paths = []
        for i, shard in enumerate(shard_sources(list(mix.names), {}, n_workers)):
            job = GradientJob(
                worker=i,
                model=str(root / "base"),
                out_dir=str(out),
                tokenizer=str(root / "tokenizer"),
                sources=tuple(shard),
                device=device.type,
                dtype=dtype,
                mixture={
                    "path": str(root / "mix"),
                    "calibration_n": spec["n"],
                    "eval_fraction": 0.0,
                },
                n=spec["n"],
                max_length=spec["max_length"],
                **_micro_kwargs(spec),
            )
            paths.append(job.save(job_paths(out, i)[0]))
        _log(f"  sharded stage: {n_workers} worker(s)")
        t0 = time.perf_counter()
        gpus = list(range(n_workers)) if count else None
        dones = launch_jobs(paths, mode="local", gpus=gpus, n_procs=None if count else n_workers)
        walls.append(time.perf_counter() - t0)
        banks.append(assemble_bank(out, list(mix.names), agreed_info(dones), {}).rows)
        workers[n_workers] = [round(d["throughput"]["tokens_per_s"], 1) for d in dones]
    tokens = sum(d["throughput"]["tokens"] for d in dones)
    diff = float(np.abs(banks[0] - banks[1]).max() / np.abs(banks[0]).max())
    shutil.rmtree(work, ignore_errors=True)  # the size's folder, as the merge leaves it
    return {
        "workers": counts,
        "wall_s": walls,
        "tokens": tokens,
        "tokens_per_s_wall": [tokens / w for w in walls],
        "speedup": walls[0] / walls[1],
        "efficiency": walls[0] / walls[1] / counts[1],
        "worker_tokens_per_s": workers,
        "bank_max_rel_diff": diff,
    }


def run(
    sizes: list[str],
    device: torch.device,
    rounds: int = 3,
    fp32: bool = True,
    work: Path | None = None,
) -> tuple[Results, dict]:
    """Every measurement for each of ``sizes``: (the figures, the JSON record)."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's shard bars
    tiny = sizes == ["tiny"]
    res = Results("gpu")
    info = machine() | {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cuda_version": torch.version.cuda,
        "transformers": transformers.__version__,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    _log(
        f"{info['gpu'] or device} | torch {torch.__version__} CUDA {torch.version.cuda} | "
        f"transformers {transformers.__version__}"
    )
    record: dict[str, Any] = {
        "machine": info,
        "tiny": tiny,
        "rounds": rounds,
        "anchor": ANCHOR,
        "sizes": {},
        "multi_gpu": "not measured",
    }
    work = work or ROOT / ".bench" / "gpu"
    for size in sizes:
        spec = SIZES[size]
        t_size = time.perf_counter()
        tok = build_tokenizer(spec["model"]["vocab_size"])
        mix = build_mixture(spec, spec["sources"])
        model = build_model(spec["model"], torch.bfloat16, device)
        n_params = sum(p.numel() for p in model.parameters())
        _log(f"{size}: {n_params / 1e6:,.1f}M parameters, bf16 on {device}")
        entry: dict[str, Any] = {
            "parameters": n_params,
            "config": spec["model"],
            "attention": model.config._attn_implementation,
        }
        entry["bf16"] = measure_gradients(model, tok, mix, spec, device, rounds)
        _add_gradient_figures(res, f"{size} bf16", entry["bf16"], tiny)
        _log(f"{size}: bergson's gradient-store build beside the stage")
        entry["bergson"] = measure_bergson(
            model, tok, mix, spec | {"tiny": tiny}, device, rounds, work / size
        )
        if isinstance(entry["bergson"], str):
            res.skip(f"{size} bergson", "bergson side by side", entry["bergson"])
        else:
            add_comparison_figures(res, f"{size} bergson", entry["bergson"], targets=not tiny)
        _log(f"{size}: merge K={K} against the disk")
        entry["merge"] = measure_merge(model, work / size, device, rounds)
        mg = entry["merge"]
        res.add(
            f"{size} merge",
            f"merge_checkpoints linear K={K} (bf16)",
            mg["merge_median_s"],
            "s",
            note=f"{(mg['bytes_read'] + mg['bytes_written']) / 1e9:.2f} GB moved, "
            f"{mg['merge_gb_per_s']:.2f} GB/s",
        )
        res.add(
            f"{size} merge",
            "disk floor: read inputs + write output (fsync)",
            mg["floor_median_s"],
            "s",
            note=f"warm page cache (the files were just written); sha256 of the same bytes in "
            f"one thread: inputs {mg['serial_sha256_inputs_s']:.2f} s + output "
            f"{mg['serial_sha256_output_s']:.2f} s",
        )
        res.add(
            f"{size} merge",
            "merge time ÷ disk floor",
            mg["ratio"],
            "×",
            target=None if tiny else ("<=", 1.3),
        )
        entry["fp32"] = None
        if fp32 and spec["fp32_sources"]:
            model.float()
            _log(f"{size}: float32, {spec['fp32_sources']} sources")
            sub = mix.select(mix.names[: spec["fp32_sources"]])
            entry["fp32"] = measure_gradients(model, tok, sub, spec, device, rounds)
            _add_gradient_figures(res, f"{size} fp32", entry["fp32"], tiny)
        if size == sizes[0]:  # one size is enough to see the scaling (0.5B by default)
            record["multi_gpu"] = measure_scaling(
                model.to(torch.bfloat16), tok, mix, spec | {"tiny": tiny}, work / size, device
            )
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        entry["seconds"] = time.perf_counter() - t_size
        record["sizes"][size] = entry
        _log(f"{size}: done in {entry['seconds']:.0f} s")
    res.add(
        "anchor",
        f"bergson: {ANCHOR['setup']}",
        ANCHOR["tokens_per_s"],
        "tok/s",
        note=f"{ANCHOR['note']}; ours above on {info['gpu'] or device}",
    )
    scaling = record["multi_gpu"]
    if isinstance(scaling, str):  # a sentence saying why not
        res.skip("multi-GPU", "sharded gradient stage scaling", scaling)
    else:
        n = scaling["workers"][1]
        name = f"sharded gradient stage: 1 → {n} workers, speed-up"
        note = (
            f"wall {scaling['wall_s'][0]:.1f} s → {scaling['wall_s'][1]:.1f} s (each worker "
            f"loads θ0); banks equal to {scaling['bank_max_rel_diff']:.1e} relative"
        )
        res.add("multi-GPU", name, scaling["speedup"], "×", note=note)
    # The conflict stage from T = 100 to 10,000 on this machine (numpy on its CPU cores: the
    # Gram of a memory-mapped bank does not use the card) beside its own matmul rate:
    # bench_conflict's rows, here so that one run of the GPU machine records them too.
    _log("conflict: bench_conflict's rows on this machine" + (" (--quick sizes)" if tiny else ""))
    conflict = bench_conflict.run(quick=tiny)
    for f in conflict.figures:
        section = f"conflict on this machine: {f.section}"
        res.figures.append(
            dataclasses.replace(f, section=section, target=None if tiny else f.target)
        )
    record["conflict"] = conflict.raw
    return res, record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.5b,1.5b", help="comma-separated: 0.5b, 1.5b")
    ap.add_argument("--tiny", action="store_true", help="a ~1M-parameter model: a smoke run")
    ap.add_argument("--out", default=None, help="write every number as JSON here")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up")
    ap.add_argument("--no-fp32", action="store_true", help="skip the float32 measurement")
    ap.add_argument("--workdir", default=None, help="checkpoints of the merge (default .bench/gpu)")
    args = ap.parse_args(argv)
    sizes = ["tiny"] if args.tiny else [s for s in args.sizes.split(",") if s]
    unknown = sorted(set(sizes) - {"0.5b", "1.5b"}) if not args.tiny else []
    if unknown or not sizes:
        ap.error(f"unknown sizes {unknown}; known: 0.5b, 1.5b")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device")
    t0 = time.perf_counter()
    res, record = run(
        sizes,
        device,
        max(1, args.rounds),
        not args.no_fp32,
        Path(args.workdir) if args.workdir else None,
    )
    res.seconds = record["seconds"] = time.perf_counter() - t0
    print()
    print_table([res])
    print(
        f"\n{record['machine']['gpu'] or device}, {record['machine']['date']}: "
        f"{record['seconds'] / 60:.1f} min in all"
    )
    if args.out:
        write_json(args.out, record | {"results": [res.to_dict()]})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
