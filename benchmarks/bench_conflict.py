"""Conflict space and partition: T = 8 to 136 in memory, and T = 100 to 10,000 out of core.

Synthetic gradient banks with structure (a low-rank signal shared by clusters of sources, plus
per-source noise and per-source norms spread over a decade), float32 rows at the default sketch
width (``DEFAULT_SKETCH_DIM``, 2^18).

In memory, T = 8, 32, 136 (best of 3): ``compute_conflict_space`` (Gram matrix, cosines, PCA,
heatmap order, the Gram and the order also timed on their own) and ``split_balanced_k``
(r = 3 → K = 8), ``split_kmeans`` and ``split_random`` for reference.

Out of core, T = 100, 316, 1000, 3162, 10000: one seeded 10,000-source bank (10 GB at 2^18) is
written once to ``.bench/conflict-bank/`` as a saved `GradientBank` (reused by later runs; the
free disk is checked first and a clear refusal printed when too small) and each T takes its
first T rows, memory-mapped (`merit_lab.gradients.bank.map_rows`). Each T runs in a fresh
process: the conflict stage's time and its parts (Gram, PCA, order), the effective rate of
the stage (T·(T+1)·d flops of the Gram, the useful arithmetic, over the whole stage's time)
against this machine's float32 matmul rate measured in the same run just before and after
(2·n³ flops of an n = 2048 product, best of 3 each time), and the peak resident memory above
the start of the stage (the mapped bank's pages leave the resident set block by block).
Targets: the stage at ≥ 0.8× the matmul rate at T = 10,000; T = 1000 conflict space + MERIT
partition in under 5 s (the same rows read into memory first, so no disk read is timed);
peak memory flat in the bank's size (only the T × T matrices grow).

``--quick``: T = 8, 32 in memory and T = 24, 64, 200 out of core at d = 2^12 with small
blocks and a low full-PCA limit, so the blocked Gram and the top-axes PCA both run (seconds).

Run: .venv/bin/python -m benchmarks.bench_conflict [--quick] [--out bench-conflict.json]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import merit_lab.analysis.conflict as conflict_mod
from benchmarks.common import (
    Results,
    bench_main,
    cached_fraction,
    in_child,
    peak_rss,
    reset_peak_rss,
)
from merit_lab.analysis.conflict import compute_conflict_space
from merit_lab.envelope import save_enveloped
from merit_lab.gradients.bank import BANK_FORMAT, BANK_VERSION, map_rows
from merit_lab.gradients.sketch import DEFAULT_SKETCH_DIM
from merit_lab.io import atomic_dir
from merit_lab.partition.methods import split_balanced_k, split_kmeans, split_random

SECTION = "conflict + partition"
TARGET_S = 5.0  # conflict space + MERIT partition at T = 1000
TARGET_RATE = 0.8  # the conflict stage ÷ this machine's matmul rate, at T = 10,000
K = 8  # r = 3
PAPER_T, PAPER_S = 136, 30 * 60
LATENT, CLUSTERS, NOISE = 6, 8, 2.0  # signal rank, source clusters, noise/signal scale
_ROW_CHUNK = 64  # rows generated at a time: bounds the generator's temporaries
LADDER = (100, 316, 1000, 3162, 10000)  # out of core, prefixes of one bank
BANK_ROOT = Path(__file__).resolve().parent.parent / ".bench" / "conflict-bank"
DISK_MARGIN = 2 * 2**30  # free disk to leave beside the bank
MATMUL_N = 2048

_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"[conflict {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _bank_blocks(t: int, dim: int, seed: int = 0) -> Iterator[np.ndarray]:
    """The rows of a (t, dim) float32 bank with cluster structure, ``_ROW_CHUNK`` at a time.

    Source i = (its cluster's centre + a per-source offset) in a rank-LATENT signal space, plus
    isotropic noise, times a per-source norm (log-uniform over a decade).
    """
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((LATENT, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
    centres = rng.standard_normal((CLUSTERS, LATENT)).astype(np.float32)
    cluster = rng.integers(0, CLUSTERS, size=t)
    coef = centres[cluster] + 0.5 * rng.standard_normal((t, LATENT)).astype(np.float32)
    scale = (10.0 ** rng.uniform(-1.0, 0.0, size=t)).astype(np.float32)
    noise_scale = np.float32(NOISE / np.sqrt(dim))
    for lo in range(0, t, _ROW_CHUNK):
        hi = min(lo + _ROW_CHUNK, t)
        block = rng.standard_normal((hi - lo, dim), dtype=np.float32)
        block *= noise_scale
        block += coef[lo:hi] @ basis
        block *= scale[lo:hi, None]
        yield block


def _names_and_counts(t: int, seed: int = 0):
    """Names and per-source example/token counts of the first t sources (any bank size)."""
    rng = np.random.default_rng([seed, 1])
    names = [f"source-{i:05d}" for i in range(t)]
    examples = {n: int(x) for n, x in zip(names, rng.integers(50, 5000, size=t), strict=True)}
    per = rng.integers(100, 400, size=t)
    tokens = {n: examples[n] * int(k) for n, k in zip(names, per, strict=True)}
    return names, examples, tokens


def make_bank(t: int, dim: int, seed: int = 0):
    """A (t, dim) float32 bank in memory (`_bank_blocks`), plus names and example/token counts."""
    rows = np.empty((t, dim), dtype=np.float32)
    for lo, block in zip(range(0, t, _ROW_CHUNK), _bank_blocks(t, dim, seed), strict=True):
        rows[lo : lo + len(block)] = block
    return rows, *_names_and_counts(t, seed)


def bank_folder(t: int, dim: int, seed: int = 0) -> Path:
    return BANK_ROOT / f"T{t}-d{dim}-seed{seed}"


def ensure_bank(t: int, dim: int, seed: int = 0) -> Path:
    """The saved bank (``bank.safetensors`` + ``bank.json``) of `_bank_blocks`, written once.

    Streamed to disk ``_ROW_CHUNK`` rows at a time inside `atomic_dir` (a kill leaves no
    half bank). Raises RuntimeError, before writing anything, when the disk lacks room.
    """
    folder = bank_folder(t, dim, seed)
    if (folder / "bank.json").is_file():
        return folder
    need = 4 * t * dim
    BANK_ROOT.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(BANK_ROOT).free
    if free < need + DISK_MARGIN:
        raise RuntimeError(
            f"refusing to write the {need / 1e9:.1f} GB synthetic bank (T={t}, d={dim:,}): "
            f"{BANK_ROOT} has {free / 1e9:.1f} GB free and needs {(need + DISK_MARGIN) / 1e9:.1f}"
            " GB (the bank + 2 GiB); free disk space or run with --quick"
        )
    _log(f"writing the T={t}, d={dim:,} bank ({need / 1e9:.2f} GB) to {folder} (once)")
    t0 = time.perf_counter()
    header = json.dumps(
        {"rows": {"dtype": "F32", "shape": [t, dim], "data_offsets": [0, need]}}
    ).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads its header to 8 bytes
    names, examples, tokens = _names_and_counts(t, seed)
    with atomic_dir(folder, overwrite=True) as tmp:
        with open(tmp / "bank.safetensors", "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
            for block in _bank_blocks(t, dim, seed):
                f.write(block.tobytes())
            f.flush()
            os.fsync(f.fileno())
        stats = {n: {"examples": examples[n], "tokens": tokens[n]} for n in names}
        meta = {"names": names, "info": {"synthetic": True, "seed": seed}, "stats": stats}
        save_enveloped(tmp / "bank.json", BANK_FORMAT, BANK_VERSION, meta)
    _log(f"bank written in {time.perf_counter() - t0:.0f} s")
    return folder


def matmul_rate(n: int = MATMUL_N, repeats: int = 3) -> float:
    """This machine's float32 matmul rate now: 2·n³ flops ÷ the best of ``repeats`` (flop/s)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # BLAS threads up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


@contextmanager
def _timed_parts(*attrs: str) -> Iterator[dict[str, float]]:
    """Time the module-level helpers of merit_lab.analysis.conflict while compute_conflict_space
    runs.

    Only wraps what exists (a renamed helper is simply not broken out); always restores.
    """
    spent: dict[str, float] = {}
    saved: dict[str, Callable] = {}

    def wrap(name: str, fn: Callable) -> Callable:
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0

        return timed

    for a in attrs:
        fn = getattr(conflict_mod, a, None)
        if callable(fn):
            saved[a] = fn
            setattr(conflict_mod, a, wrap(a, fn))
    try:
        yield spent
    finally:
        for a, fn in saved.items():
            setattr(conflict_mod, a, fn)


_PARTS = ("_gram", "_all_eigenpairs", "_top_eigenpairs", "_cluster_order")


def _warm_up() -> None:
    """First calls import scipy/sklearn and warm BLAS: keep them out of the timings."""
    rows, names, ex, tok = make_bank(16, 256, seed=1)
    space = compute_conflict_space(rows, names)
    split_balanced_k(space, ex, tok, k=K)
    split_kmeans(space, ex, tok, k=K, seed=0)
    split_random(names, ex, tok, k=K, seed=0)


def _one_pass(rows, names, ex, tok) -> dict:
    with _timed_parts(*_PARTS) as parts:
        t0 = time.perf_counter()
        space = compute_conflict_space(rows, names)
        t1 = time.perf_counter()
    part = split_balanced_k(space, ex, tok, k=K)
    t2 = time.perf_counter()
    split_kmeans(space, ex, tok, k=K, seed=0)
    t4 = time.perf_counter()
    split_random(names, ex, tok, k=K, seed=0)
    t5 = time.perf_counter()
    loads = [sum(ex[s] for s in g) for g in part.groups]
    return dict(
        conflict_s=t1 - t0,
        balanced_s=t2 - t1,
        total_s=t2 - t0,
        kmeans_s=t4 - t2,
        random_s=t5 - t4,
        gram_s=parts.get("_gram", float("nan")),
        order_s=parts.get("_cluster_order", float("nan")),
        n_axes=space.n_axes,
        top3_explained=float(space.explained_variance_ratio[:3].sum()),
        group_examples_max_over_min=max(loads) / min(loads),
    )


def measure(t: int, dim: int, repeats: int = 1) -> dict:
    """Build a bank of t sources in memory and time conflict + splits on it (best of
    ``repeats``)."""
    _warm_up()
    rows, names, ex, tok = make_bank(t, dim)
    passes = [_one_pass(rows, names, ex, tok) for _ in range(repeats)]
    best = min(passes, key=lambda p: p["total_s"])
    for key in ("conflict_s", "balanced_s", "kmeans_s", "random_s"):
        best[key] = min(p[key] for p in passes)
    return {"t": t, "dim": dim, "repeats": repeats, **best}


def measure_mapped(
    folder: str,
    t: int,
    block_bytes: int | None = None,
    full_pca_max: int | None = None,
    in_memory: bool = False,
) -> dict:
    """The conflict stage (+ balanced split) on the first t rows of the mapped bank in
    ``folder``: times, parts and peak RSS above the start. Module level: runs in a fresh
    process (``in_child``); ``block_bytes``/``full_pca_max`` shrink the module's limits;
    ``in_memory`` reads the rows into memory first (not timed), so no disk read is timed."""
    limits = {"_BLOCK_BYTES": block_bytes, "_FULL_PCA_MAX": full_pca_max}
    saved = {k: getattr(conflict_mod, k) for k in limits}
    try:
        for k, v in limits.items():
            setattr(conflict_mod, k, saved[k] if v is None else v)
        return _measure_mapped(folder, t, in_memory)
    finally:
        for k, v in saved.items():
            setattr(conflict_mod, k, v)


def _measure_mapped(folder: str, t: int, in_memory: bool) -> dict:
    _warm_up()
    rows = map_rows(folder)[:t]
    if in_memory:
        rows = np.array(rows)
    names, ex, tok = _names_and_counts(t)
    base = reset_peak_rss()
    with _timed_parts(*_PARTS) as parts:
        t0 = time.perf_counter()
        space = compute_conflict_space(rows, names)
        t1 = time.perf_counter()
    part = split_balanced_k(space, ex, tok, k=K)
    t2 = time.perf_counter()
    peak = peak_rss() - base
    return {
        "t": t,
        "dim": int(rows.shape[1]),
        "bank_bytes": int(rows.nbytes),
        "conflict_s": t1 - t0,
        "balanced_s": t2 - t1,
        "total_s": t2 - t0,
        "gram_s": parts.get("_gram", 0.0),
        "pca_s": parts.get("_all_eigenpairs", 0.0) + parts.get("_top_eigenpairs", 0.0),
        "pca": "full eigh" if "_all_eigenpairs" in parts else "Lanczos (eigsh), top axes",
        "axes": int(space.eigenvalues.shape[0]),
        "order_s": parts.get("_cluster_order", 0.0),
        "block_columns": conflict_mod._column_width(t, 4),
        "extra_peak_bytes": peak,
        "top3_explained": float(space.explained_variance_ratio[:3].sum()),
        "group_sizes": [len(g) for g in part.groups],
    }


def run_ladder(quick: bool) -> tuple[list[dict], dict]:
    """The out-of-core ladder: each T in a fresh process, the matmul rate before and after."""
    if quick:
        ladder, dim, kw = (24, 64, 200), 2**12, {"block_bytes": 2**16, "full_pca_max": 50}
    else:
        ladder, dim, kw = LADDER, DEFAULT_SKETCH_DIM, {}
    folder = ensure_bank(max(ladder), dim)
    n = 512 if quick else MATMUL_N
    rates = [matmul_rate(n)]
    out = []
    for t in ladder:
        cached = cached_fraction([folder / "bank.safetensors"])
        where = "this process" if quick else "a fresh process"
        _log(f"T={t}, d={dim:,}: mapped bank ({cached:.0%} of it in the page cache), {where}")
        # --quick stays in this process: a fresh one costs more than its whole ladder
        r = (
            measure_mapped(str(folder), t, **kw)
            if quick
            else in_child(measure_mapped, str(folder), t, **kw)[0]
        )
        rates.append(matmul_rate(n))
        rate = statistics.mean(rates[-2:])
        flops = t * (t + 1) * dim
        r.update(
            bank_cached=cached,
            matmul_flops=rate,
            stage_flops=flops / r["conflict_s"],
            gram_flops=flops / r["gram_s"],
        )
        r["vs_matmul"] = r["stage_flops"] / rate
        _log(
            f"  conflict {r['conflict_s']:.2f} s (Gram {r['gram_s']:.2f}, PCA {r['pca_s']:.2f}, "
            f"order {r['order_s']:.2f}); {r['stage_flops'] / 1e9:.1f} GFLOP/s = "
            f"{r['vs_matmul']:.2f}× matmul ({rate / 1e9:.1f}); peak +"
            f"{r['extra_peak_bytes'] / 2**20:,.0f} MiB"
        )
        out.append(r)
    # the T = 1000 target (or --quick's middle T) on the same rows read into memory first
    t = 1000 if 1000 in ladder else ladder[len(ladder) // 2]
    _log(f"T={t}: the same rows in memory, {'this process' if quick else 'a fresh process'}")
    kw_mem = {**kw, "in_memory": True}
    mem = (
        measure_mapped(str(folder), t, **kw_mem)
        if quick
        else in_child(measure_mapped, str(folder), t, **kw_mem)[0]
    )
    _log(f"  conflict + balanced split {mem['total_s']:.2f} s (Gram {mem['gram_s']:.2f})")
    return out, {"dim": dim, "folder": str(folder), "matmul_flops_all": rates, "in_memory_run": mem}


def run(quick: bool = False) -> Results:
    res = Results("conflict")
    ts, dim = ((8, 32), 2**12) if quick else ((8, 32, PAPER_T), DEFAULT_SKETCH_DIM)
    small: list[dict] = []
    for t in ts:
        _log(f"T={t}, d={dim:,}: in memory, best of 3")
        small.append(measure(t, dim, repeats=3))
    for r in small:
        res.add(
            SECTION,
            f"T={r['t']}: conflict space + balanced split (K={K})",
            r["total_s"],
            "s",
            note=f"in memory, d={dim:,}, best of 3: conflict {r['conflict_s']:.3f} s (Gram "
            f"{r['gram_s']:.3f}, heatmap order {r['order_s']:.3f}), balanced split "
            f"{r['balanced_s'] * 1e3:.1f} ms; k-means {r['kmeans_s']:.3f} s, random "
            f"{r['random_s'] * 1e3:.1f} ms",
        )
    r136 = next((r for r in small if r["t"] == PAPER_T), None)
    if r136 is not None:
        res.add(
            SECTION,
            f"T={PAPER_T}: paper's ~30 min ÷ our conflict space",
            PAPER_S / r136["conflict_s"],
            "×",
            note=f"ours {r136['conflict_s']:.3f} s on {dim:,}-wide sketched rows; the "
            "paper's figure is the similarity matrix of full 7B gradients (1/5 subsample), "
            "so this is context, not like-for-like",
        )

    try:
        ladder, info = run_ladder(quick)
    except RuntimeError as e:  # not enough disk for the bank: said once, clearly
        _log(str(e))
        res.skip(SECTION, "out-of-core ladder (T = 100 to 10,000)", str(e))
        res.raw.update(dim=dim, k=K, in_memory=small)
        return res
    res.raw.update(k=K, in_memory=small, in_memory_dim=dim, ladder=ladder, **info)
    print(
        f"{'T':>6}{'stage s':>10}{'Gram':>9}{'PCA':>8}{'order':>8}{'GFLOP/s':>9}{'÷matmul':>9}"
        f"{'peak MiB':>10}{'bank MiB':>10}{'cached':>8}",
        file=sys.stderr,
    )
    for r in ladder:
        print(
            f"{r['t']:>6}{r['conflict_s']:>10.2f}{r['gram_s']:>9.2f}{r['pca_s']:>8.2f}"
            f"{r['order_s']:>8.2f}{r['stage_flops'] / 1e9:>9.1f}{r['vs_matmul']:>9.2f}"
            f"{r['extra_peak_bytes'] / 2**20:>10,.0f}{r['bank_bytes'] / 2**20:>10,.0f}"
            f"{r['bank_cached']:>8.0%}",
            file=sys.stderr,
        )
    d_ = info["dim"]
    for r in ladder:
        tb = f"T={r['t']}"
        res.add(
            SECTION,
            f"{tb}: conflict stage ÷ the matmul rate (mapped bank)",
            r["vs_matmul"],
            "×",
            target=(">=", TARGET_RATE) if r["t"] == LADDER[-1] else None,
            note=f"{r['conflict_s']:.2f} s: Gram {r['gram_s']:.2f}, PCA {r['pca_s']:.2f} "
            f"({r['pca']}, {r['axes']} axes), order {r['order_s']:.2f}; "
            f"{r['stage_flops'] / 1e9:.1f} GFLOP/s (T·(T+1)·d) vs float32 matmul "
            f"{r['matmul_flops'] / 1e9:.1f} GFLOP/s measured before and after; "
            f"{r['bank_bytes'] / 1e9:.2f} GB bank, d={d_:,}, {r['bank_cached']:.0%} in the "
            f"page cache at the start; blocks of {r['block_columns']:,} columns",
        )
        res.add(
            SECTION,
            f"{tb}: peak memory above the start (mapped bank)",
            r["extra_peak_bytes"] / 2**20,
            "MiB",
            note=f"conflict space + balanced split, VmHWM reset at the start; the bank is "
            f"{r['bank_bytes'] / 2**20:,.0f} MiB; T×T float64 = {8 * r['t'] ** 2 / 2**20:,.0f} MiB",
        )
    mem = info["in_memory_run"]
    mapped = next(r for r in ladder if r["t"] == mem["t"])
    res.add(
        SECTION,
        f"T={mem['t']}: conflict space + balanced split (bank in memory)",
        mem["total_s"],
        "s",
        target=("<", TARGET_S) if mem["t"] == 1000 else None,
        note=f"the MERIT path from the bank to the partition: Gram {mem['gram_s']:.2f} s, PCA "
        f"{mem['pca_s']:.2f} s, order {mem['order_s']:.2f} s, balanced split "
        f"{mem['balanced_s'] * 1e3:.0f} ms; the same rows memory-mapped: "
        f"{mapped['total_s']:.2f} s ({mapped['bank_cached']:.0%} in the page cache)",
    )
    return res


if __name__ == "__main__":
    bench_main(run, __doc__)
