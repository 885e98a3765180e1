"""The gradient stage beside bergson's gradient-store build: same model, examples and width.

Bergson (EleutherAI, PyPI ``bergson`` 2.5.1) is the peer a reviewer compares with. It runs in
its own venv, ``.bench/bergson-venv`` (made here on first use, like the mergekit venv of
``bench_merge``): torch 2.13.0 (the CPU wheel) first, then bergson with a constraints file
pinning torch, so pip can never swap it; the torch there is checked afterwards and the venv
refused otherwise. The project's own venv is never touched. bergson declares torchvision,
torchaudio and bitsandbytes but imports none of them on this path; the PyPI torchvision wheel is
built for the CUDA torch and breaks ``import transformers`` beside the CPU torch, so the three
are uninstalled again.

For each model (the demo base, 8 sources x 200 examples; SmolLM2-135M, 8 sources x 16
dialogues, skipped when ``fetch-model smollm2`` / ``fetch-data chatterbot`` have not run):

* **the same examples**: our tokeniser (`tokenize_examples`: the chat template, response-only
  labels, -100 elsewhere) makes every example once, and bergson is handed those token ids and
  labels as its dataset (its ``input_ids``/``labels`` columns), so both compute the loss on the
  same tokens. Our stage's time includes tokenising; bergson's does not.
* **the same width**: ours count-sketches every parameter into one 2^18 row per source;
  bergson projects each of its M modules' per-example gradients (the Linear layers of the
  decoder: no embedding, norm or ``lm_head``) two-sided to p x p, p = round(sqrt(2^18 / M)),
  so M·p² ≈ 2^18 (its ``projection_target=global`` at 2^18 would draw a params x 2^18 matrix
  per batch). Bergson stores one row per example (its index); the benchmark sums them per
  source. Bergson sums token losses per example (its default), ours takes each source's mean:
  the same direction, so the same cosines.
* **tokens/s** of the build (model already loaded, warm-up done) and **peak memory**, each side
  in a fresh process per round (ours `in_child`, bergson its venv's python), measured the way
  `benchmarks.common` does: VmHWM reset just before the measured build, minus the RSS then
  (bergson's includes the pages of its memory-mapped store). ≥ 3 rounds alternating who goes
  first; medians, spreads in the notes. Targets: ahead of bergson on both.
* **cosine agreement** of the two banks' T x T source cosines, off the diagonal: Pearson and
  max |diff|; ours again over bergson's parameters only (one untimed stage run), so both
  estimate the same exact cosines; and, for the demo base, each against the exact cosines
  (full gradients; too large to hold for SmolLM2's 134.5M parameters x 8 sources here).

Run: python -m benchmarks.bench_bergson [--quick] [--out bench-bergson.json]
(``--quick``: 3 sources x 8 examples of the demo base, one round; never installs bergson.)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks.common import Results, bench_main, in_child, peak_rss, reset_peak_rss

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / ".bench"
BG_VENV = BENCH_DIR / "bergson-venv"
BG_TORCH, BG_VERSION = "torch==2.13.0", "bergson==2.5.1"
# declared by bergson, imported by none of its build path; torchvision's PyPI wheel (CUDA torch)
# breaks `import transformers` beside the CPU torch
BG_UNUSED = ("torchvision", "torchaudio", "bitsandbytes")
WIDTH = 2**18  # ours: the default count-sketch width; bergson: M·p² closest to it
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
HOW_TO_BUILD = "`python -m benchmarks.bench_bergson` builds it (about 2.5 min from PyPI)"


def _log(msg: str) -> None:
    print(f"[bergson] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- pure parts, tested
def projection_side(n_modules: int, width: int = WIDTH) -> int:
    """Bergson's per-module side p whose total width n_modules·p² is closest to ``width``."""
    if n_modules < 1 or width < 1:
        raise ValueError(f"need n_modules ≥ 1 and width ≥ 1, got {n_modules}, {width}")
    lo = max(1, math.isqrt(width // n_modules))
    return min((lo, lo + 1), key=lambda p: abs(n_modules * p * p - width))


def cosine_matrix(rows: np.ndarray) -> np.ndarray:
    """(T, T) float64 cosines of the rows of a (T, d) array."""
    x = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    if not np.all(norms > 0):
        raise ValueError("a row is all zeros: its cosines are undefined")
    return (x @ x.T) / np.outer(norms, norms)


def sum_by_source(rows: np.ndarray, source_of: Sequence[int], n_sources: int) -> np.ndarray:
    """(n_sources, d) float64: the per-example rows summed per source (``source_of[i]``)."""
    idx = np.asarray(source_of)
    if len(idx) != len(rows) or idx.min() < 0 or idx.max() >= n_sources:
        raise ValueError("source_of must give each row a source in [0, n_sources)")
    out = np.zeros((n_sources, rows.shape[1]), dtype=np.float64)
    np.add.at(out, idx, np.asarray(rows, dtype=np.float64))
    return out


def cosine_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Pearson correlation and max |a − b| of two (T, T) cosine matrices, off the diagonal
    (Pearson is nan for T = 2: one pair)."""
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
        raise ValueError(f"need two equal (T, T) matrices with T ≥ 2, got {a.shape}, {b.shape}")
    iu = np.triu_indices(a.shape[0], k=1)
    x, y = a[iu], b[iu]
    pearson = float(np.corrcoef(x, y)[0, 1]) if len(x) > 1 else float("nan")
    return {"pearson": pearson, "max_abs_diff": float(np.abs(x - y).max())}


def torch_refusal(version: str, wanted: str = BG_TORCH) -> str | None:
    """Why a venv whose torch reports ``version`` is refused, or None when it is the pinned one
    (a local label such as ``+cpu`` is allowed)."""
    want = wanted.split("==", 1)[1]
    if version.split("+", 1)[0] == want:
        return None
    return f"torch there is {version}, not {want}: refused (pip must not replace torch)"


def _spread(xs: Sequence[float], unit: str, scale: float = 1.0, fmt: str = ",.0f") -> str:
    return f"{min(xs) / scale:{fmt}}-{max(xs) / scale:{fmt}} {unit}".rstrip()


def add_comparison_figures(res: Results, section: str, cmp: dict, targets: bool = True) -> None:
    """The rows of one model: tokens/s and peak memory of each side beside the ahead-of-bergson
    targets, then the cosine agreement (Pearson, max |diff|) where measured."""
    rates = {
        side: [cmp["tokens"] / s for s in cmp[side]["seconds"]] for side in ("ours", "bergson")
    }
    med = {side: statistics.median(r) for side, r in rates.items()}
    n = len(cmp["ours"]["seconds"])
    res.add(
        section,
        "gradient stage (ours)",
        med["ours"],
        "tok/s",
        note=f"{cmp['workload']}; {_spread(rates['ours'], 'tok/s')} over {n} rounds",
    )
    res.add(
        section,
        "bergson gradient-store build",
        med["bergson"],
        "tok/s",
        note=f"{_spread(rates['bergson'], 'tok/s')}; {cmp['bergson_setup']}",
    )
    res.add(
        section,
        "ours ÷ bergson, tokens/s (ahead of bergson)",
        med["ours"] / med["bergson"],
        "×",
        target=(">=", 1.0) if targets else None,
    )
    mem = {side: statistics.median(cmp[side]["peak_bytes"]) for side in ("ours", "bergson")}
    for side, label in (("ours", "ours"), ("bergson", "bergson")):
        res.add(
            section,
            f"peak memory, {label}",
            mem[side] / 2**20,
            "MiB",
            note=f"{cmp['memory_kind']}; {_spread(cmp[side]['peak_bytes'], 'MiB', 2**20)}",
        )
    res.add(
        section,
        "ours ÷ bergson, peak memory (ahead of bergson)",
        mem["ours"] / max(mem["bergson"], 1),
        "×",
        target=("<=", 1.0) if targets else None,
    )
    for key, label in (
        ("ours_vs_bergson", "source cosines, ours vs bergson (same parameters)"),
        ("ours_all_vs_bergson", "source cosines, ours (every parameter) vs bergson"),
        ("ours_vs_exact", "source cosines, ours vs exact (every parameter)"),
        ("bergson_vs_exact", "source cosines, bergson vs exact (its parameters)"),
        ("ours_same_parameters_vs_exact", "source cosines, ours vs exact (bergson's parameters)"),
        ("exact_all_vs_exact_bergson", "exact cosines, every parameter vs bergson's"),
    ):
        agree = cmp.get("agreement", {}).get(key)
        if agree is None:
            continue
        res.add(
            section,
            f"{label}: max |diff|",
            agree["max_abs_diff"],
            note=f"Pearson {agree['pearson']:.5f}, {cmp['n_sources']} x {cmp['n_sources']} "
            "off the diagonal",
        )
    if "exact_skipped" in cmp:
        res.skip(section, "source cosines against the exact ones", cmp["exact_skipped"])


# ------------------------------------------------------------------------------ the venv
def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def bergson_python(venv: Path | None = None) -> Path | None:
    """The python of a completed bergson venv (its stamp written), or None (not probed)."""
    venv = venv or BG_VENV
    exe = _venv_python(venv)
    return exe if (venv / ".bench-ok").is_file() and exe.is_file() else None


def _run(cmd: list[str], timeout: int = 1800) -> tuple[int, str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 1, str(e)
    return proc.returncode, proc.stdout + proc.stderr


def _probe(exe: Path, torch_spec: str) -> str | None:
    """None when the venv's torch is ``torch_spec``'s and bergson's build imports, else why not."""
    code = "import torch; print(torch.__version__)"
    rc, out = _run([str(exe), "-c", code], timeout=300)
    if rc != 0:
        return f"`import torch` fails there: {out.strip()[-300:]}"
    why = torch_refusal(out.strip().splitlines()[-1], torch_spec)
    if why:
        return why
    rc, out = _run([str(exe), "-c", "import bergson.build, bergson.collection"], timeout=600)
    return None if rc == 0 else f"`import bergson.build` fails: {out.strip()[-300:]}"


def ensure_bergson(
    install: bool,
    venv: Path | None = None,
    *,
    base_python: str | None = None,
    torch_spec: str = BG_TORCH,
    system_site: bool = False,
) -> tuple[Path | None, str]:
    """The python of ``venv`` with bergson, made here when missing or broken.

    ``system_site``: the venv sees ``base_python``'s packages (a CUDA torch on a GPU machine)
    and only bergson and what it lacks are installed; ``torch_spec`` is then that torch's
    version, pinned the same way. Returns (python or None, how it was had, or why not)."""
    venv = venv or BG_VENV
    exe = bergson_python(venv)
    if exe is not None:
        why = _probe(exe, torch_spec) if install else None
        if why is None:
            return exe, f"reused {venv.relative_to(ROOT) if venv.is_relative_to(ROOT) else venv}"
    if not install:
        return None, f"no {venv.name} (--quick never installs it): {HOW_TO_BUILD}"
    _log(f"installing {BG_VERSION} into {venv} (once) ...")
    shutil.rmtree(venv, ignore_errors=True)
    base = base_python or shutil.which("python3") or sys.executable
    make = [base, "-m", "venv", *(["--system-site-packages"] if system_site else []), str(venv)]
    rc, out = _run(make)
    if rc != 0:
        return None, f"`python -m venv` failed: {out.strip()[-300:]}"
    constraints = venv / "constraints.txt"
    constraints.write_text(torch_spec + "\n")
    pip = [str(_venv_python(venv)), "-m", "pip", "install", "--quiet"]
    steps = [] if system_site else [[*pip, torch_spec]]  # the local CPU wheel first
    steps += [
        [*pip, "-c", str(constraints), BG_VERSION],
        [str(_venv_python(venv)), "-m", "pip", "uninstall", "--yes", "--quiet", *BG_UNUSED],
    ]
    for cmd in steps:
        rc, out = _run(cmd)
        if rc != 0 and "uninstall" not in cmd:
            tail = " | ".join(out.strip().splitlines()[-3:])
            return None, f"`{' '.join(cmd[-2:])}` exited {rc}: {tail[-400:]}"
    why = _probe(_venv_python(venv), torch_spec)
    if why is not None:
        return None, why  # no stamp: the next run tries again from scratch
    (venv / ".bench-ok").write_text(f"{torch_spec} {BG_VERSION}\n")
    return _venv_python(venv), f"installed into {venv.name}"


# -------------------------------------------------------------------------- bergson's side
def bergson_worker(job_file: str) -> None:
    """Runs under the bergson venv: load the model, warm up, then one timed gradient-store build
    (bergson's ``build_worker`` minus the model load and tokenising) over the job's examples;
    writes the per-source sums of its per-example rows and the measurements beside the job."""
    import torch
    from bergson.collection import collect_gradients
    from bergson.config.config import IndexConfig, PreprocessConfig
    from bergson.data import allocate_batches, load_gradients
    from bergson.utils.worker_utils import create_processor, setup_model_and_peft
    from datasets import Dataset

    job = json.loads(Path(job_file).read_text())
    work = Path(job_file).parent
    ids, labels = job["input_ids"], job["labels"]
    data = Dataset.from_dict({"input_ids": ids, "labels": labels, "length": [len(x) for x in ids]})

    def config(run: str) -> IndexConfig:
        return IndexConfig(
            run_path=str(work / run),
            model=job["model"],
            precision=job["precision"],
            projection_dim=job["p"],
            token_batch_size=job["token_batch_size"],
        )

    cfg = config("store")
    model, targets = setup_model_and_peft(cfg)
    device = model.device

    def build(cfg: IndexConfig, ds) -> None:  # build_worker's steps after the model load
        cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
        processor = create_processor(model, cfg, targets)
        batches = allocate_batches(ds["length"][:], cfg.token_batch_size)
        collect_gradients(
            model=model,
            data=ds,
            processor=processor,
            cfg=cfg,
            batches=batches,
            target_modules=targets,
            attention_cfgs={},
            preprocess_cfg=PreprocessConfig(),
        )

    build(config("warmup"), data.select(range(min(4, len(data)))))
    shutil.rmtree(work / "warmup.part", ignore_errors=True)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = reset_peak_rss()
    t0 = time.perf_counter()
    build(cfg, data)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss() - base
    store = load_gradients(cfg.partial_run_path)
    sums = sum_by_source(store, job["source_of"], len(job["sources"])).astype(np.float32)
    np.save(work / "bergson_rows.npy", sums)
    info = json.loads((cfg.partial_run_path / "info.json").read_text())
    report = {
        "seconds": seconds,
        "peak_bytes": int(peak),
        "memory_kind": "GPU max_memory_allocated" if cuda else "peak RSS growth",
        "width": int(store.shape[1]),
        "modules": list(info["grad_sizes"]),
        "store_bytes": int((cfg.partial_run_path / "gradients.bin").stat().st_size),
        "store_dtype": info["base_dtype"],
        "torch": torch.__version__,
        "device": str(device),
    }
    (work / "bergson_report.json").write_text(json.dumps(report))
    shutil.rmtree(cfg.partial_run_path, ignore_errors=True)


def run_bergson(exe: Path, job: dict, work: Path) -> tuple[dict, np.ndarray]:
    """One bergson round in a fresh process of its venv: (its report, (T, width) source sums)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    job_file = work / "job.json"
    job_file.write_text(json.dumps(job))
    env = dict(os.environ, **OFFLINE, PYTHONPATH=str(ROOT))
    cmd = [str(exe), "-m", "benchmarks.bench_bergson", "--worker", str(job_file)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bergson exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    report = json.loads((work / "bergson_report.json").read_text())
    rows = np.load(work / "bergson_rows.npy")
    shutil.rmtree(work, ignore_errors=True)
    return report, rows


# ------------------------------------------------------------------------------ our side
@dataclass(frozen=True)
class Workload:
    """One model and its examples, rebuilt the same way in every process."""

    label: str  # "demo base", "SmolLM2-135M"
    model: str  # a name `load_model` resolves, or a folder
    mixture: str  # a name or folder `load_mixture` reads
    sources: int  # the first this many sources
    n: int  # examples per source
    micro_batch_size: int
    max_length: int
    calibration_n: int | None = None  # load_mixture's, for a folder of sources
    eval_fraction: float | None = None

    def load(self):
        """(tokenizer, model on the CPU, mixture of the chosen sources)."""
        from merit_lab.data.mixture import load_mixture
        from merit_lab.models.loading import load_model, load_tokenizer

        kw = {}
        if self.calibration_n is not None:
            kw = {"calibration_n": self.calibration_n, "eval_fraction": self.eval_fraction}
        mix = load_mixture(self.mixture, **kw)
        mix = mix.select(mix.names[: self.sources])
        return load_tokenizer(self.model), load_model(self.model, device="cpu"), mix


def _stage(model, tok, mix, w: Workload, include: Sequence[str] | None = None):
    from merit_lab.gradients.estimate import estimate_gradients

    return estimate_gradients(
        model,
        tok,
        mix,
        n=w.n,
        micro_batch_size=w.micro_batch_size,
        max_length=w.max_length,
        include=include,
        progress=False,
    )


def ours_child(w: Workload) -> dict:
    """One round of our stage in a fresh process: model loaded, warm-up, then the timed stage
    with its peak RSS growth (VmHWM reset just before it)."""
    import torch

    torch.manual_seed(0)
    tok, model, mix = w.load()
    _stage(model, tok, mix.select(mix.names[:1]), replace(w, n=min(4, w.n)))  # warm-up
    base = reset_peak_rss()
    t0 = time.perf_counter()
    bank = _stage(model, tok, mix, w)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_bytes": peak_rss() - base, "rows": np.array(bank.rows)}


def bergson_targets(model) -> list[str]:
    """The modules bergson collects (its ``discover_targets`` over ``model.base_model``: the
    decoder's Linear layers), as our parameter names of their weights."""
    import torch

    base = model.base_model
    prefix = next(n for n, m in model.named_modules() if m is base)
    return [
        f"{prefix}.{n}.weight" if prefix else f"{n}.weight"
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]


def bergson_job(
    model,
    tok,
    mix,
    *,
    n: int,
    max_length: int,
    token_batch_size: int,
    model_path: str,
    precision: str,
) -> dict:
    """The examples as our stage tokenises them (token ids, -100 outside responses), for
    bergson's dataset; p from its module count; its token budget per batch."""
    from merit_lab.data.formatting import tokenize_examples

    ids, labels, source_of = [], [], []
    for s, src in enumerate(mix):
        for ex in tokenize_examples(tok, src.calibration, max_length, limit=n):
            ids.append(list(ex.input_ids))
            labels.append(list(ex.labels))
            source_of.append(s)
    modules = bergson_targets(model)
    return {
        "model": model_path,
        "precision": precision,
        "p": projection_side(len(modules)),
        "n_modules": len(modules),
        "token_batch_size": token_batch_size,
        "input_ids": ids,
        "labels": labels,
        "source_of": source_of,
        "sources": list(mix.names),
    }


def exact_cosines(model, tok, mix, w: Workload, names: Sequence[str] | None) -> np.ndarray:
    """(T, T) cosines of the full source gradients (mean response-token loss of each source's
    first n examples) over ``names`` (every selected parameter when None)."""
    import torch

    from merit_lab.data.formatting import tokenize_examples
    from merit_lab.gradients.estimate import source_gradient
    from merit_lab.models.loading import select_parameters

    selected = select_parameters(model, include=names)
    rows = []
    for src in mix:
        model.zero_grad(set_to_none=True)
        ex = tokenize_examples(tok, src.calibration, w.max_length, limit=w.n)
        source_gradient(model, ex, pad_token_id=tok.pad_token_id or 0, micro_batch_size=8)
        rows.append(torch.cat([p.grad.detach().double().flatten() for _, p in selected]).numpy())
    model.zero_grad(set_to_none=True)
    return cosine_matrix(np.stack(rows))


# ------------------------------------------------------------------------------- rounds
def alternate(
    rounds: int, ours: Callable[[], dict], bergson: Callable[[], dict]
) -> dict[str, list[dict]]:
    """``rounds`` rounds of both sides, who goes first alternating."""
    out: dict[str, list[dict]] = {"ours": [], "bergson": []}
    for r in range(rounds):
        order = ("ours", "bergson") if r % 2 == 0 else ("bergson", "ours")
        for side in order:
            out[side].append((ours if side == "ours" else bergson)())
        _log(
            f"  round {r + 1}/{rounds}: ours {out['ours'][-1]['seconds']:.2f} s, bergson "
            f"{out['bergson'][-1]['seconds']:.2f} s"
        )
    return out


def compare_cpu(exe: Path, w: Workload, rounds: int, exact: bool) -> dict:
    """Every measurement of one CPU workload (see the module docstring)."""
    tok, model, mix = w.load()
    job = bergson_job(
        model,
        tok,
        mix,
        n=w.n,
        max_length=w.max_length,
        token_batch_size=w.micro_batch_size * w.max_length,  # ours pads to at most this
        model_path=str(_model_folder(w.model)),
        precision="fp32",
    )
    tokens = sum(map(len, job["input_ids"]))
    work = BENCH_DIR / "bergson-work"
    last: dict[str, np.ndarray] = {}

    def ours() -> dict:
        out, _, _ = in_child(ours_child, w)
        last["ours"] = out.pop("rows")
        return out

    def bergson() -> dict:
        report, last["bergson"] = run_bergson(exe, job, work)
        return report

    _log(f"{w.label}: {len(mix)} sources x {w.n}, {tokens:,} tokens, p = {job['p']}")
    runs = alternate(rounds, ours, bergson)
    cmp = summarize_rounds(runs, tokens, f"{len(mix)} sources x {w.n} examples", job)
    _log(f"{w.label}: ours over bergson's {job['n_modules']} modules (untimed), cosines")
    names = bergson_targets(model)
    same = np.array(_stage(model, tok, mix, w, include=names).rows)
    c_ours, c_berg = cosine_matrix(same), cosine_matrix(last["bergson"])
    agree = {
        "ours_vs_bergson": cosine_agreement(c_ours, c_berg),
        "ours_all_vs_bergson": cosine_agreement(cosine_matrix(last["ours"]), c_berg),
    }
    if exact:
        ex_all = exact_cosines(model, tok, mix, w, None)
        ex_lin = exact_cosines(model, tok, mix, w, names)
        agree["ours_vs_exact"] = cosine_agreement(cosine_matrix(last["ours"]), ex_all)
        agree["bergson_vs_exact"] = cosine_agreement(c_berg, ex_lin)
        agree["ours_same_parameters_vs_exact"] = cosine_agreement(c_ours, ex_lin)
        agree["exact_all_vs_exact_bergson"] = cosine_agreement(ex_all, ex_lin)
    else:
        n_params = sum(p.numel() for p in model.parameters())
        cmp["exact_skipped"] = (
            f"not computed: {len(mix)} full gradients of {n_params / 1e6:.1f}M parameters "
            f"({len(mix) * n_params * 8 / 2**30:.1f} GiB in float64) on a shared machine"
        )
    cmp["agreement"] = agree
    return cmp


def summarize_rounds(runs: dict, tokens: int, workload: str, job: dict) -> dict:
    """The rounds of `alternate` as `add_comparison_figures` reads them."""
    b0 = runs["bergson"][-1]
    return {
        "workload": f"{workload}, {tokens:,} tokens",
        "tokens": tokens,
        "n_sources": len(job["sources"]),
        "ours": {k: [r[k] for r in runs["ours"]] for k in ("seconds", "peak_bytes")},
        "bergson": {k: [r[k] for r in runs["bergson"]] for k in ("seconds", "peak_bytes")},
        "memory_kind": b0["memory_kind"],
        "bergson_setup": (
            f"{job['n_modules']} modules x {job['p']}², width {b0['width']:,} (ours "
            f"{WIDTH:,}); per-example store {b0['store_bytes'] / 2**20:,.0f} MiB "
            f"{b0['store_dtype']}; token batches of {job['token_batch_size']:,}"
        ),
        "bergson_width": b0["width"],
        "bergson_modules": job["n_modules"],
        "p": job["p"],
        "bergson_torch": b0["torch"],
    }


def _model_folder(name: str) -> Path:
    from merit_lab.models.loading import resolve_model_path

    return Path(resolve_model_path(name))


def _workloads(quick: bool) -> list[tuple[Workload | None, str]]:
    """(workload, "") for each model to measure, or (None, why it is skipped)."""
    from merit_lab.config.schema import load_config
    from merit_lab.models.fetch import RECORD, fetched_model_path

    demo = load_config(ROOT / "configs" / "demo.yaml").calibration
    out: list[tuple[Workload | None, str]] = [
        (
            Workload(
                "demo base",
                "demo",
                "demo",
                3 if quick else 8,
                8 if quick else demo.n,
                demo.micro_batch_size,
                demo.max_length,
            ),
            "",
        )
    ]
    if quick:
        return out
    cfg = load_config(ROOT / "configs" / "smollm2.yaml")
    data = ROOT / cfg.mixture.path
    if not (fetched_model_path("smollm2") / RECORD).is_file() or not data.is_dir():
        why = "run `merit-lab fetch-model smollm2` and `merit-lab fetch-data chatterbot` first"
        return [*out, (None, why)]
    cal = cfg.calibration
    smol = Workload(
        "SmolLM2-135M",
        "smollm2",
        str(data),
        8,
        cal.n,
        cal.micro_batch_size,
        cal.max_length,
        calibration_n=cal.n,
        eval_fraction=cfg.mixture.eval_fraction,
    )
    return [*out, (smol, "")]


def run(quick: bool = False) -> Results:
    res = Results("bergson")
    exe, how = ensure_bergson(install=not quick)
    res.raw["venv"] = how
    if exe is None:
        _log(f"skipped: {how}")
        res.skip("bergson", "bergson side by side", how)
        return res
    for w, why in _workloads(quick):
        section = f"bergson, {w.label if w else 'SmolLM2-135M'}"
        if w is None:
            res.skip(section, "bergson side by side", why)
            continue
        cmp = compare_cpu(exe, w, 1 if quick else 3, exact=w.model == "demo")
        add_comparison_figures(res, section, cmp, targets=not quick)
        res.raw[w.label] = cmp
    return res


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        bergson_worker(sys.argv[2])
    else:
        bench_main(run, __doc__)
