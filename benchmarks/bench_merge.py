"""Merge stage: throughput against the disk's own limit, flat peak RSS, and mergekit's linear merge.

Measures, on synthetic fp32 Llama checkpoints built from a config (θ0 + small seeded noise per
branch, K = 4, saved by ``save_pretrained``, cached under ``.bench/merge/``):

  a. the time of ``merge_checkpoints(method="linear")`` against the limit of the disk measured in
     the same run: plain big-buffer Python reads of the K inputs' safetensors plus a write of the
     output's bytes with the same fsync policy (one fsync per shard), in the same page-cache
     state as the merge (warm: the files were just read; part c also measures a cold cache).
     ``REPS`` rounds, each the merge (its default xxh3_128 digests), the limit and the merge
     with sha256 digests (the old manifest format), in an order that rotates per round so
     that the load of other work hits all three; medians and [min–max] of per-round ratios;
  b. the merge's peak RSS (spawned child) as the model grows by layers at a fixed hidden size, so
     the largest tensor (embedding / lm_head) stays the same: flat, about (K + 2) × that tensor;
  c. mergekit's ``mergekit-yaml`` (installed in ``.bench/mergekit-venv``, made here on first use)
     on the ``mergekit.yaml`` our merge writes, against our merge run the same way, as a
     command (``python -c``): both pay interpreter start and imports, which are also timed
     alone (so the merge's own time is reported net of them). ``ROUNDS`` rounds of each,
     alternating which goes first, on the L5 family (1.9 GB of inputs, to keep it near 3 min);
     first with the inputs in the page cache, then with them evicted before every command
     (``posix_fadvise(POSIX_FADV_DONTNEED)`` per file: no root needed, and ``mincore`` checks
     that nothing stayed resident). Median and [min–max] of the wall times; memory split into
     anonymous and file-backed peaks (``/proc/<pid>/status`` RssAnon / RssFile sampled every
     5 ms, beside the exact ru_maxrss): the inputs both sides read through mmap count as
     file-backed pages, which the kernel can drop under pressure, unlike anonymous ones.
     Also the max |difference| of the two outputs.

Run: .venv/bin/python -m benchmarks.bench_merge [--quick] [--out bench-merge.json]
(``--quick``: tiny models, no mergekit unless its venv already works, and then one round of
each; under 30 s, or under a minute with mergekit.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.common import (
    CommandMemory,
    Results,
    bench_main,
    cached_fraction,
    command_memory,
    drop_page_cache,
    in_child,
)
from merit_lab.io import atomic_dir, sha256_file
from merit_lab.merging.digests import file_digest
from merit_lab.merging.stream import merge_checkpoints

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / ".bench"
CACHE = BENCH_DIR / "merge"
MK_VENV = BENCH_DIR / "mergekit-venv"
MK_TORCH, MK_VERSION = "torch==2.13.0", "mergekit==0.1.5"
SECTION = "merge"
K = 4
WEIGHTS = [0.4, 0.3, 0.2, 0.1]
NOISE = 1e-3
EQUAL = "max |ours − mergekit| / max |tensor| (all tensors)"
ROUNDS = 5  # of each side, per page-cache state, in the mergekit comparison
REPS = 3  # rounds of merge / disk limit / merge with sha256 digests (part a)
CHUNK = 1 << 26  # 64 MiB: the big buffer of the plain-I/O limit

# The model grows by layers; hidden size and vocabulary (so the largest tensors) stay fixed.
FULL = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "layers": (2, 5, 8),
    "mergekit_layers": 5,  # the rounds of the mergekit comparison: 20 commands in ~3 min
}
QUICK = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4000,
    "layers": (1, 2, 4),
    "mergekit_layers": 4,
}


def log(msg: str) -> None:
    print(f"[bench_merge] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- checkpoints
def _config_dict(sizes: dict, layers: int) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    return {k: sizes[k] for k in keys} | {
        "vocab_size": sizes["vocab_size"],
        "num_hidden_layers": layers,
        "tie_word_embeddings": False,  # lm_head is its own (largest) tensor, as in most models
    }


def build_family(cfg: dict) -> list[Path]:
    """K branch folders θ0 + NOISE·N(0, 1) (seeded), cached under ``.bench/merge/<key>``.

    The family is built in a temp folder, fsynced (so no writeback runs during the timings) and
    renamed, so an interrupted build never leaves a half family behind.
    """
    spec = {"config": cfg, "k": K, "noise": NOISE, "seed": 0, "dtype": "float32"}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    final = CACHE / f"L{cfg['num_hidden_layers']}-h{cfg['hidden_size']}-{key}"
    branches = [final / f"b{k}" for k in range(K)]
    if all((b / "config.json").is_file() for b in branches):
        return branches
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    log(f"building {K} checkpoints {final.name} ...")
    with atomic_dir(final, overwrite=True) as tmp:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**cfg)).float()
        theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        for k in range(K):
            gen = torch.Generator().manual_seed(1000 + k)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(theta0[n]).add_(torch.randn(p.shape, generator=gen), alpha=NOISE)
            model.save_pretrained(tmp / f"b{k}")
            for f in (tmp / f"b{k}").iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        (tmp / "spec.json").write_text(json.dumps(spec, indent=2))
    return branches


def _family_facts(branches: list[Path]) -> dict:
    """Input files, their bytes, and the largest tensor's bytes (from the headers)."""
    files = [f for b in branches for f in sorted(b.glob("*.safetensors"))]
    largest = 0
    for f in files[: len(files) // K]:  # one branch: all have the same tensors
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for key, v in header.items():
            if key != "__metadata__":
                largest = max(largest, v["data_offsets"][1] - v["data_offsets"][0])
    return {
        "files": files,
        "input_bytes": sum(f.stat().st_size for f in files),
        "largest_tensor_bytes": largest,
    }


# ------------------------------------------------------------------------------- measurements
def _merge_job(inputs: list[str], out: str, weights: list[float], digest: str = "xxh3_128") -> dict:
    """One merge in a spawned child, under cProfile (few calls, so the overhead is small)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    report = merge_checkpoints(inputs, out, weights=weights, progress=False, digest=digest)
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:12]
    return {
        "report_seconds": report.seconds,  # merge_checkpoints' own clock (before the manifest)
        "bytes_written": report.bytes_written,
        "n_tensors": report.n_tensors,
        "profile_main_thread": _categories(stats),
        "top_tottime": [(f"{fn}:{line}({name})", round(v[2], 3)) for (fn, line, name), v in top],
    }


def _categories(stats: dict) -> dict[str, float]:
    """Main-thread time by what it was doing (reading, writing and digests run on threads
    beside it: waiting for them is what the main thread does when it is ahead)."""
    rules = {
        "fsync": ("fsync",),
        "write (into the page cache)": ("'write' of '_io",),
        "waiting for the read / write / digest threads": ("'acquire' of '_thread.lock'",),
        "finite checks (aminmax)": ("aminmax", "isfinite"),
        "merge arithmetic": ("merge_linear", "'add_'", "'mul'"),
        "reading headers (safe_open)": ("safe_open", "get_tensor", "get_slice", "offset_keys"),
        "digests (in the main thread)": ("'update' of '_hashlib", "'update' of 'xxhash"),
    }
    out = dict.fromkeys(rules, 0.0)
    total = 0.0
    for (file, _, name), v in stats.items():
        total += v[2]
        if name == "read" and file.endswith("checkpoints.py"):  # Checkpoint.read: open, map, close
            out["reading tensors (safe_open)"] += v[2]
            continue
        for cat, needles in rules.items():
            if any(n.strip("'") in name for n in needles):
                out[cat] += v[2]
                break
    out["everything else"] = total - sum(out.values())
    return {k: round(v, 3) for k, v in out.items()}


def disk_limit(files: list[Path], out_parent: Path, shard_bytes: list[int]) -> dict:
    """Plain big-buffer I/O of the bytes the merge moves: read every input file, then write
    ``shard_bytes`` to fresh files beside the merge's output, one fsync per file (as the merge
    does per shard). The write reuses the last buffer read, so it writes real data."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    t0 = time.perf_counter()
    n_read = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                n_read += n
    t_read = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(dir=out_parent, prefix=".limit-", suffix=".tmp"))
    try:
        t0 = time.perf_counter()
        for i, size in enumerate(shard_bytes):
            with open(tmp / f"shard{i}", "wb", buffering=0) as f:
                left = size
                while left:
                    left -= f.write(view[: min(left, CHUNK)])
                os.fsync(f.fileno())
        t_write = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"read_s": t_read, "write_s": t_write, "bytes_read": n_read}


def serial_hash_seconds(paths: list[Path], algorithm: str = "sha256") -> float:
    """The digest of ``paths`` in one thread (sha256 by default, or a key of
    `merit_lab.merging.digests.DIGESTS`): the work the merge overlaps with its own."""
    t0 = time.perf_counter()
    for p in paths:
        sha256_file(p) if algorithm == "sha256" else file_digest(p, algorithm)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------- mergekit
def _mergekit_works(probe: bool = True) -> bool:
    """The venv was completed here (stamp) and, with ``probe``, mergekit still imports."""
    if not (MK_VENV / ".bench-ok").is_file() or not (MK_VENV / "bin" / "mergekit-yaml").is_file():
        return False
    if not probe:  # --quick: a broken venv shows up as mergekit's own failure, in a note
        return True
    probe = [str(MK_VENV / "bin" / "python"), "-c", "import mergekit.merge"]
    return subprocess.run(probe, capture_output=True, timeout=300).returncode == 0


def mergekit_yaml() -> Path | None:
    """The ``mergekit-yaml`` of a completed ``.bench/mergekit-venv``, or None (not probed)."""
    return MK_VENV / "bin" / "mergekit-yaml" if _mergekit_works(probe=False) else None


def ensure_mergekit(install: bool) -> tuple[Path | None, str]:
    """The ``mergekit-yaml`` of ``.bench/mergekit-venv``, made here when missing or broken.

    Returns (executable or None, how it was had, or why not)."""
    if _mergekit_works(probe=install):
        return MK_VENV / "bin" / "mergekit-yaml", "reused .bench/mergekit-venv"
    if not install:
        return None, "no working .bench/mergekit-venv (--quick never installs it)"
    log(f"installing {MK_VERSION} into {MK_VENV.relative_to(ROOT)} (once) ...")
    shutil.rmtree(MK_VENV, ignore_errors=True)
    pip = [str(MK_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    steps = [
        [shutil.which("python3") or sys.executable, "-m", "venv", str(MK_VENV)],
        [*pip, MK_TORCH],  # the local CPU wheel first: a bare torch would pull a CUDA build
        [*pip, MK_VERSION],
    ]
    for cmd in steps:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"`{' '.join(cmd[-2:])}` failed: {e}"
        if proc.returncode != 0:
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
            return None, f"`{' '.join(cmd[-2:])}` exited {proc.returncode}: {tail[-400:]}"
    (MK_VENV / ".bench-ok").write_text(f"{MK_TORCH} {MK_VERSION}\n")
    if not _mergekit_works():
        return None, "mergekit installed but `import mergekit.merge` fails"
    return MK_VENV / "bin" / "mergekit-yaml", "installed into .bench/mergekit-venv"


def compare_outputs(ours: Path, theirs: Path) -> dict:
    """Max |ours − theirs| over every tensor, absolute and relative to the tensor's max |value|."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                out.update(dict.fromkeys(h.keys(), f))
        return out

    a, b = index(ours), index(theirs)
    max_abs = max_rel = 0.0
    exact = 0
    dtypes = set()
    for key in sorted(a.keys() & b.keys()):
        with safe_open(a[key], framework="pt") as fa, safe_open(b[key], framework="pt") as fb:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
        dtypes.add(f"{x.dtype}/{y.dtype}")
        if x.shape != y.shape:
            return {"error": f"{key}: shape {list(x.shape)} vs {list(y.shape)}"}
        d = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        scale = x.double().abs().max().item() if x.numel() else 0.0
        max_abs, exact = max(max_abs, d), exact + (d == 0.0)
        max_rel = max(max_rel, d / scale if scale else d)
        del x, y
    return {
        "n_tensors": len(a.keys() & b.keys()),
        "only_ours": sorted(a.keys() - b.keys())[:5],
        "only_mergekit": sorted(b.keys() - a.keys())[:5],
        "n_exact": exact,
        "max_abs": max_abs,
        "max_rel": max_rel,
        "dtypes": sorted(dtypes),
    }


# ----------------------------------------------------------------------------------------- run
def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def run(quick: bool = False) -> Results:
    res = Results("merge")
    sizes = QUICK if quick else FULL
    reps = 1 if quick else REPS
    tgt = (lambda t: None) if quick else (lambda t: t)  # quick sizes are all fixed costs
    work = BENCH_DIR / "merge-out"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _run(res, sizes, reps, tgt, work, quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


def _run(res: Results, sizes: dict, reps: int, tgt, work: Path, quick: bool) -> None:
    families = {n: build_family(_config_dict(sizes, n)) for n in sizes["layers"]}
    facts = {n: _family_facts(b) for n, b in families.items()}
    big = max(families)
    res.raw["models"] = {
        f"L{n}": {
            "input_bytes": f["input_bytes"],
            "per_checkpoint_bytes": f["input_bytes"] // K,
            "largest_tensor_bytes": f["largest_tensor_bytes"],
        }
        for n, f in facts.items()
    }
    res.raw |= {"k": K, "weights": WEIGHTS, "config": sizes, "reps": reps}
    inputs, out = [str(b) for b in families[big]], work / "ours"

    # a. the merge against plain I/O of the same bytes: `reps` rounds of (merge, limit, merge
    # with sha256 digests), the order rotating per round so that other work's load hits all
    per = facts[big]["input_bytes"] / K / 2**20
    log(f"merge vs disk limit: K={K} x {per:.0f} MiB, {reps} round(s) ...")
    disk_limit(facts[big]["files"], work, [])  # warm the page cache (untimed)
    merges, shas, limits, peaks = [], [], [], []
    shards: list[int] = []

    def merge(digest: str, into: list) -> None:
        nonlocal shards
        shutil.rmtree(out, ignore_errors=True)
        job, seconds, peak = in_child(_merge_job, inputs, str(out), WEIGHTS, digest)
        into.append(job | {"merge_seconds": seconds})  # the whole call, manifest and rename too
        peaks.append(peak)
        shards = [f.stat().st_size for f in sorted(out.glob("*.safetensors"))]

    steps = {
        "merge": lambda: merge("xxh3_128", merges),
        "limit": lambda: limits.append(disk_limit(facts[big]["files"], work, shards)),
        "merge_sha256": lambda: merge("sha256", shas),
    }
    merge("xxh3_128", [])  # untimed: the output's shard sizes for the first limit
    orders = []
    for i in range(reps):
        order = list(steps)[i % 3 :] + list(steps)[: i % 3]
        orders.append(order)
        for name in order:
            steps[name]()
    t_limits = [x["read_s"] + x["write_s"] for x in limits]
    ratios = [j["merge_seconds"] / t for j, t in zip(merges, t_limits, strict=True)]
    sha_ratios = [j["merge_seconds"] / t for j, t in zip(shas, t_limits, strict=True)]
    mid = sorted(range(reps), key=lambda i: ratios[i])[reps // 2]  # the median round
    t_merge, t_limit = merges[mid]["merge_seconds"], t_limits[mid]
    moved = facts[big]["input_bytes"] + merges[mid]["bytes_written"]
    outs = sorted(out.glob("*.safetensors"))
    serial = {
        algo: (serial_hash_seconds(facts[big]["files"], algo), serial_hash_seconds(outs, algo))
        for algo in ("sha256", "xxh3_128")
    }
    ratio = statistics.median(ratios)
    parts = sorted(merges[mid]["profile_main_thread"].items(), key=lambda kv: -kv[1])
    where = ", ".join(f"{k} {v:.2f} s" for k, v in parts)
    verdict = ""
    if not quick and ratio > 1.3:
        verdict = (
            f". MISSED by {(ratio / 1.3 - 1) * 100:.0f}%: the merge's own CPU work (arithmetic, "
            "finite checks and digests, on threads) shares 2 cores that the plain I/O has to "
            f"itself; 1-min load average {os.getloadavg()[0]:.1f}"
        )
    sha_in, sha_out = serial["sha256"]
    xx_in, xx_out = serial["xxh3_128"]
    res.add(
        SECTION,
        "merge time / disk limit (read K inputs + write output + fsync)",
        ratio,
        "×",
        target=tgt(("<=", 1.3)),
        note=(
            f"median of {reps} rounds, per-round ratio {_spread(ratios, '×')}; the median round: "
            f"merge {t_merge:.2f} s vs limit {t_limit:.2f} s (read "
            f"{_gb(facts[big]['input_bytes'])} {limits[mid]['read_s']:.2f} s + write "
            f"{_gb(merges[mid]['bytes_written'])} with fsync {limits[mid]['write_s']:.2f} s); "
            "warm page cache (the files were just read; cold: see the mergekit rounds). The "
            "merge reads every input byte once and digests it from the same buffer (xxh3_128, "
            f"in one thread: inputs {xx_in:.2f} s + output {xx_out:.2f} s; sha256 would be "
            f"{sha_in:.2f} s + {sha_out:.2f} s) on threads beside the merge. Main thread of "
            f"the median round: {where}{verdict}"
            + ("; --quick: a tiny model, so fixed costs dominate (no target)" if quick else "")
        ),
    )
    res.add(
        SECTION,
        "merge time / disk limit, sha256 digests (the old manifest format)",
        statistics.median(sha_ratios),
        "×",
        note=f"merge_checkpoints(digest='sha256') in the same rounds: per-round ratio "
        f"{_spread(sha_ratios, '×')}, merge {_spread([j['merge_seconds'] for j in shas])}",
    )
    res.add(SECTION, "merge throughput (bytes read + written / s)", moved / t_merge / 1e9, "GB/s")
    res.raw["throughput"] = {
        "orders": orders,
        "merge_seconds": [j["merge_seconds"] for j in merges],
        "merge_sha256_seconds": [j["merge_seconds"] for j in shas],
        "limit": limits,
        "ratio_per_rep": ratios,
        "ratio_sha256_per_rep": sha_ratios,
        "bytes_read": facts[big]["input_bytes"],
        "bytes_written": merges[mid]["bytes_written"],
        "serial_sha256_inputs_s": sha_in,
        "serial_sha256_output_s": sha_out,
        "serial_xxh3_128_inputs_s": xx_in,
        "serial_xxh3_128_output_s": xx_out,
        "loadavg_1min_after": os.getloadavg()[0],
        "breakdown_main_thread_s": merges[mid]["profile_main_thread"],
        "top_tottime_main_thread_s": merges[mid]["top_tottime"],
    }

    # b. peak RSS as the model grows by layers (largest tensor fixed)
    rss = {big: max(peaks)}
    for n in sorted(families)[:-1]:
        log(f"peak RSS: L{n} ...")
        o = work / f"rss-L{n}"
        _, _, rss[n] = in_child(_merge_job, [str(b) for b in families[n]], str(o), WEIGHTS)
        shutil.rmtree(o, ignore_errors=True)
    small, largest = min(rss), facts[big]["largest_tensor_bytes"]
    grow = facts[big]["input_bytes"] / facts[small]["input_bytes"]
    res.add(
        SECTION,
        f"peak RSS L{big} / L{small} (model {grow:.2f}× bigger)",
        rss[big] / rss[small],
        "×",
        target=tgt(("<=", 1.3)),
        note="; ".join(f"L{n}: {rss[n] / 2**20:.0f} MiB" for n in sorted(rss)),
    )
    res.add(
        SECTION,
        f"peak RSS / ((K+2) × largest tensor), L{big}",
        rss[big] / ((K + 2) * largest),
        "×",
        target=tgt(("<=", 1.25)),
        note=f"largest tensor {largest / 2**20:.0f} MiB (embedding / lm_head), K={K}",
    )
    res.raw["peak_rss_bytes"] = {f"L{n}": v for n, v in sorted(rss.items())}

    # c. mergekit on the same inputs, from the mergekit.yaml our merge writes
    n_mk = sizes["mergekit_layers"]
    mk_inputs = [str(b) for b in families[n_mk]]
    model = f"L{n_mk}, K={K} × {facts[n_mk]['input_bytes'] / K / 2**20:.0f} MiB"
    rounds = 1 if quick else ROUNDS
    _vs_mergekit(res, mk_inputs, facts[n_mk]["files"], work, rounds, quick, tgt, model)


def _spread(xs: list[float], unit: str = "s", scale: float = 1.0, fmt: str = ".2f") -> str:
    """``median [min–max] unit`` of ``xs`` (divided by ``scale``)."""
    m, lo, hi = statistics.median(xs) / scale, min(xs) / scale, max(xs) / scale
    return f"{m:{fmt}} [{lo:{fmt}}–{hi:{fmt}}] {unit}".rstrip()


def _vs_mergekit(
    res: Results,
    inputs: list[str],
    files: list[Path],
    work: Path,
    rounds: int,
    quick: bool,
    tgt,
    model: str,
) -> None:
    """mergekit-yaml against our merge, both as commands, ``rounds`` alternating rounds each,
    warm and then cold page cache, memory split into anonymous and file-backed."""
    exe, how = ensure_mergekit(install=not quick)
    res.raw["mergekit"] = {"venv": how, "model": model}
    if exe is None:
        log(f"mergekit skipped: {how}")
        res.skip(SECTION, "mergekit comparison", how)
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    code = (
        "import json, sys; from merit_lab.merging.stream import merge_checkpoints as m; "
        "a = json.loads(sys.argv[1]); m(a['inputs'], a['out'], weights=a['w'], progress=False)"
    )
    cfg = work / "mergekit.yaml"

    def command(side: str, out: Path) -> list[str]:
        if side == "ours":
            args = json.dumps({"inputs": inputs, "out": str(out), "w": WEIGHTS})
            return [sys.executable, "-c", code, args]
        return [
            str(exe),
            str(cfg),
            str(out),
            "--no-cuda",
            "--no-copy-tokenizer",
            "--no-write-model-card",
            "--quiet",
        ]

    def once(side: str, out: Path) -> CommandMemory:
        try:
            return command_memory(command(side, out), env=env, cwd=str(work))
        finally:  # untimed: no writeback of this output may run into the next command's time
            os.sync()

    # untimed first runs: our merge writes the mergekit.yaml that mergekit then runs, and the
    # two outputs are compared
    log("mergekit vs ours: first run of each (untimed), compared tensor by tensor ...")
    ours0, theirs0 = work / "ours-cmd", work / "mergekit"
    first_ours = once("ours", ours0)
    shutil.copy(ours0 / "mergekit.yaml", cfg)  # our merge's own record of itself
    try:
        first_mk = once("mergekit", theirs0)
    except RuntimeError as e:
        res.raw["mergekit"]["error"] = str(e)[-2000:]
        res.skip(SECTION, "mergekit comparison", f"mergekit failed: {e!s:.300}")
        return
    cmp = compare_outputs(ours0, theirs0)
    shutil.rmtree(ours0, ignore_errors=True)
    shutil.rmtree(theirs0, ignore_errors=True)

    # start-up alone: the interpreter and the imports each command pays before any merging
    starts: dict[str, list[CommandMemory]] = {"ours": [], "mergekit": []}
    imports = "import json, sys; from merit_lab.merging.stream import merge_checkpoints"
    start_cmd = {
        "ours": [sys.executable, "-c", imports],
        "mergekit": [str(exe), "--help"],  # imports all of mergekit-yaml's modules, then exits
    }
    for _ in range(max(1, rounds - 2)):
        for side in starts:
            starts[side].append(command_memory(start_cmd[side], env=env, cwd=str(work)))

    load_before = os.getloadavg()[0]  # other work on the cores shows up as spread
    runs: dict[tuple[str, str], list[CommandMemory]] = {}
    resident: dict[str, list[float]] = {"warm": [], "cold": []}
    for state in ("warm", "cold"):
        log(f"mergekit vs ours: {rounds} rounds each, {state} page cache ...")
        for i in range(rounds):
            order = ("ours", "mergekit") if i % 2 == 0 else ("mergekit", "ours")
            for side in order:  # alternate who goes first
                if state == "cold":
                    drop_page_cache(files)
                resident[state].append(cached_fraction(files))
                out = work / f"{side}-{state}-{i}"
                runs.setdefault((side, state), []).append(once(side, out))
                shutil.rmtree(out, ignore_errors=True)

    def secs(side: str, state: str) -> list[float]:
        return [r.seconds for r in runs[side, state]]

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    every = {side: runs[side, "warm"] + runs[side, "cold"] for side in starts}
    res.raw["mergekit"] |= {
        "command": command("mergekit", Path("OUT"))[1:],
        "config": cfg.read_text(),
        "rounds": rounds,
        "runs": {
            f"{side}/{state}": [asdict(r) | {"output": r.output[-300:]} for r in v]
            for (side, state), v in runs.items()
        },
        "startup": {side: [asdict(r) | {"output": ""} for r in v] for side, v in starts.items()},
        "first_run": {"ours": asdict(first_ours), "mergekit": asdict(first_mk)},
        "inputs_cached_fraction_before_each_command": resident,
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
        "compare": cmp,
    }
    basis = (
        f"{model}; both as commands (interpreter start, imports, merge, exit), {rounds} "
        "rounds each alternating which goes first, median [min–max]; 1-min load average "
        f"{load_before:.1f} before the rounds, {os.getloadavg()[0]:.1f} after"
    )
    ratios: dict[str, list[float]] = {}
    for state in ("warm", "cold"):
        mk, ours = secs("mergekit", state), secs("ours", state)
        ratios[state] = [a / b for a, b in zip(mk, ours, strict=True)]
        cache = (
            "inputs in the page cache (read by the previous command)"
            if state == "warm"
            else "inputs evicted before every command (posix_fadvise DONTNEED; resident share "
            f"before each command at most {100 * max(resident['cold']):.1f}%)"
        )
        res.add(
            SECTION,
            f"mergekit time / ours, {state} page cache",
            med(mk) / med(ours),
            "×",
            target=tgt((">=", 1.0)),  # ahead of mergekit, start-up included
            note=f"mergekit {_spread(mk)} vs ours {_spread(ours)}; per-round ratio "
            f"{_spread(ratios[state], '×')}; {basis}; {cache}",
        )
    net = {s: med(secs(s, "warm")) - med([r.seconds for r in starts[s]]) for s in starts}
    net_name = "mergekit time / ours, net of start-up, warm"
    if min(net.values()) <= 0:  # --quick: the tiny merge is lost in the start-up's noise
        res.skip(SECTION, net_name, f"start-up dominates this model's merge (net {net})")
    else:
        res.add(
            SECTION,
            net_name,
            net["mergekit"] / net["ours"],
            "×",
            target=tgt((">=", 1.0)),  # ahead of mergekit, start-up excluded
            note=f"the warm medians less each command's start-up alone (ours: `python -c` "
            f"importing merit_lab.merging.stream, {_spread([r.seconds for r in starts['ours']])}; "
            f"mergekit: `mergekit-yaml --help`, {_spread([r.seconds for r in starts['mergekit']])}"
            f"): mergekit {net['mergekit']:.2f} s vs ours {net['ours']:.2f} s. Ours also fsyncs "
            "every shard, digests every byte (xxh3_128, for the manifest) and checks every "
            "merged piece for NaN/Inf inside its time; mergekit does none of these, and its "
            "writeback is flushed (os.sync) after its clock stops",
        )
    mib = 2**20
    for label, attr, what in (
        ("anonymous", "peak_anon", "RssAnon: heap and tensors"),
        ("file-backed", "peak_file", "RssFile: mapped inputs and shared libraries"),
        ("total (ru_maxrss)", "max_rss", "anonymous + file-backed at the peak, exact"),
    ):
        mk = [getattr(r, attr) for r in every["mergekit"]]
        ours = [getattr(r, attr) for r in every["ours"]]
        base = {s: med([getattr(r, attr) for r in starts[s]]) for s in starts}
        res.add(
            SECTION,
            f"peak {label} RSS: mergekit / ours",
            med(mk) / med(ours),
            "×",
            note=f"{what}; mergekit {_spread(mk, 'MiB', mib, '.0f')} vs ours "
            f"{_spread(ours, 'MiB', mib, '.0f')} over all {2 * rounds} runs each (warm and "
            f"cold); start-up alone: mergekit {base['mergekit'] / mib:.0f} MiB, ours "
            f"{base['ours'] / mib:.0f} MiB",
        )
    gap = max(1 - r.peak_rss_sampled / r.max_rss for v in every.values() for r in v if r.max_rss)
    res.raw["mergekit"]["sampling"] = {
        "interval_s": 0.005,
        "worst_sampled_peak_below_ru_maxrss": gap,
        "samples_per_run": [r.samples for v in every.values() for r in v],
    }

    if "error" in cmp or cmp["only_ours"] or cmp["only_mergekit"]:
        res.add(SECTION, EQUAL, math.nan, target=tgt(("<=", 1e-6)), note=str(cmp))
        return
    same = f"{cmp['n_exact']}/{cmp['n_tensors']} tensors bit-identical"
    if cmp["n_exact"] < cmp["n_tensors"]:
        same += (
            f", max abs diff {cmp['max_abs']:.3g} (mergekit sums 0 + Σ w·θ by addcmul_, ours "
            "w1·θ1 then add_: roundings may differ by an ulp)"
        )
    res.add(
        SECTION,
        EQUAL,
        cmp["max_rel"],
        target=tgt(("<=", 1e-6)),
        note=f"fp32 in and out on both sides ({', '.join(cmp['dtypes'])}); {same}",
    )


if __name__ == "__main__":
    bench_main(run, __doc__)
