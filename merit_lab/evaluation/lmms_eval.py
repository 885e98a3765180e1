"""lmms-evaluation-harness on an image-text model folder: benchmark scores as rows of
``eval.parquet``.

Input: a Qwen2-VL-style model folder (or the loaded model and its `ImageTextTokenizer`), lmms-eval
task names (its built-in benchmarks, or task folders under ``include_path``) and the judge of the
judged tasks. Output: a long table like `merit_lab.evaluation.lm_eval.run_lm_eval`'s (split
"lmms-eval") plus one ``score`` row per task on a 0-100 scale, each row with its ``judge``.
lmms-eval (``pip install 'merit-lab[paper]'``) is imported only when a run asks for it.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd

from merit_lab.config.fields import JUDGE_KEY_ENV, lmms_eval_problems
from merit_lab.evaluation.evaluate import generate_answers
from merit_lab.evaluation.lm_eval import COLUMNS, results_rows

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "LMMS_EVAL_SPLIT",
    "PAPER_BENCHMARKS",
    "Benchmark",
    "answer_requests",
    "judge_environment",
    "judge_record",
    "lmms_eval_task_problems",
    "run_lmms_eval",
    "summarize_lmms_eval",
]

log = logging.getLogger(__name__)

LMMS_EVAL_SPLIT = "lmms-eval"  # the `split` of lmms-eval rows
DEFAULT_MAX_NEW_TOKENS = 128  # a task without max_new_tokens (as lmms-eval's Qwen2-VL classes)
INSTALL = "pip install 'merit-lab[paper]' (install torch first: docs/guide/paper.md)"
DEFAULT_API_BASE = {"openai": "https://api.openai.com/v1"}  # lmms-eval's own default


@dataclass(frozen=True)
class Benchmark:
    """A benchmark of the paper's table: its column title, the lmms-eval metric it reports and
    the factor that puts that metric on 0-100 (lmms-eval gives some as fractions)."""

    title: str
    metric: str  # as `results_rows` names it: "<metric>" or "<metric>/<filter>"
    scale: float


# The paper's eight benchmarks (and MMBench's judge-free variant), as lmms-eval 0.7 reports them.
PAPER_BENCHMARKS: dict[str, Benchmark] = {
    "seedbench": Benchmark("SEED-Bench", "seed_image", 100.0),
    "mmbench_en_dev": Benchmark("MMBench", "gpt_eval_score", 1.0),
    "mmbench_en_dev_static": Benchmark("MMBench (static)", "gpt_eval_score", 1.0),
    "llava_in_the_wild": Benchmark("LLaVA-W", "gpt_eval_llava_all", 1.0),
    "mmvet": Benchmark("MM-Vet", "gpt_eval_score", 1.0),
    "textvqa_val": Benchmark("TextVQA", "exact_match", 100.0),
    "ai2d": Benchmark("AI2D", "exact_match/flexible-extract", 100.0),
    "mathvista_testmini_format": Benchmark("MathVista", "llm_as_judge_eval", 1.0),
    "mmmu_val": Benchmark("MMMU", "mmmu_acc", 100.0),
}


def run_lmms_eval(
    model_dir: str | Path,
    tasks: Sequence[str],
    *,
    label: str | None = None,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    max_new_tokens: int | None = None,
    judge: Mapping[str, Any] | None = None,
    output_dir: str | Path | None = None,
    device: str = "cpu",
    model: Any = None,
    tokenizer: Any = None,
) -> pd.DataFrame:
    """Run lmms-eval's ``simple_evaluate`` on one image-text model, greedy answers throughout.

    The model answers through `answer_requests` (its own chat template and image processor, as
    it was trained), registered in-process as an lmms-eval model of the simple interface.

    Args:
        model_dir: the HF model folder (loaded here unless ``model`` is given).
        tasks: lmms-eval task names.
        label: the ``model`` column (default: the folder's name).
        include_path: a folder of task folders (YAML + utils.py); lmms-eval's built-in tasks are
            indexed too unless every task is found there.
        limit: at most this many documents per task.
        max_new_tokens: a cap on each task's answer length (None: the task's own).
        judge: the LLM judge of the judged tasks (``eval.lmms_eval.judge``); its API key is read
            from the environment variable it names.
        output_dir: where lmms-eval's aggregations write their files (``submissions/``: e.g.
            MMBench's answer sheet for its server); None: a temporary folder, deleted.
        model, tokenizer: an already loaded model and its `ImageTextTokenizer`.

    Returns:
        `results_rows`' rows for every (task, metric), then one ``score`` row per task (and
        ``score_stderr`` where lmms-eval gives a stderr): its `PAPER_BENCHMARKS` metric ×
        scale, else its first metric (× 100 when aggregated by lmms-eval's ``mean``). Every
        row's ``judge`` is `judge_record` as JSON ("" without a judge).

    Raises:
        ValueError: bad options, an unknown task, or the judge's key missing from the environment.
        ImportError: lmms-eval is not installed.
    """
    opts = {"tasks": list(tasks), "limit": limit, "batch_size": batch_size}
    opts |= {"max_new_tokens": max_new_tokens, "judge": judge}
    problems = lmms_eval_problems(opts)
    if problems:
        raise ValueError("; ".join(problems))
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"lmms_eval.include_path: {include_path} is not a folder")
    try:
        from lmms_eval.evaluator import simple_evaluate
    except ImportError as e:
        raise ImportError(f"lmms-eval is not installed: {INSTALL}") from e

    manager = _task_manager(str(include_path) if include_path else None, tuple(tasks))
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise ValueError(f"lmms-eval has no tasks {missing} (include_path={include_path})")
    if model is None:
        from merit_lab.models.loading import load_model, load_tokenizer

        model, tokenizer = load_model(model_dir, device=device), load_tokenizer(model_dir)
    lm = _harness_model(model, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens)
    _skip_filelock_patch()
    with judge_environment(judge), tempfile.TemporaryDirectory() as scratch:
        # lmms-eval's aggregations write into cli_args.output_path (else the working directory)
        cli = SimpleNamespace(output_path=str(output_dir or scratch), process_with_media=True)
        out = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=1000,  # stderr of the metrics that need a bootstrap
            cli_args=cli,
        )
    return harness_rows(out, label or Path(model_dir).name, judge)


def _skip_filelock_patch() -> None:
    """lmms-eval 0.7 patches ``filelock._api`` (filelock 3's private module, gone in filelock 4,
    which torch and datasets now bring) so that dataset loading on several ranks shares one
    lock; on one process, with filelock 4, that patch fails at import: skip it."""
    import lmms_eval.evaluator as evaluator

    patch = getattr(evaluator, "_enable_reentrant_filelocks", None)
    if patch is not None and importlib.util.find_spec("filelock._api") is None:
        patch._patched = True  # the flag the patch itself sets once it has run


def _task_manager(include: str | None, tasks: tuple[str, ...]) -> Any:
    """lmms-eval's TaskManager over ``include`` alone when it holds every task, else over the
    built-in tasks too (that index takes ~9 s)."""
    from lmms_eval.tasks import TaskManager

    if include is not None:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include, include_defaults=True)


def _harness_model(model: Any, tokenizer: Any, *, batch_size: int, max_new_tokens: int | None):
    """``model`` as an lmms-eval model instance (the class is defined here: lmms-eval is
    optional)."""
    from lmms_eval.api.model import lmms

    class MeritImageTextModel(lmms):
        """A loaded image-text model answering lmms-eval's ``generate_until`` requests."""

        is_simple = True

        def generate_until(self, requests: Sequence[Any]) -> list[str]:
            def doc(task: str, split: str, doc_id: int) -> Any:
                return self.task_dict[task][split][doc_id]

            return answer_requests(
                model,
                tokenizer,
                [r.args for r in requests],
                doc,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
            )

        def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
            raise NotImplementedError(
                "eval.lmms_eval: only generate_until tasks (as lmms-eval's Qwen2-VL classes)"
            )

        def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
            raise NotImplementedError("eval.lmms_eval: multi-round tasks are not supported")

    return MeritImageTextModel()


def answer_requests(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple],
    doc: Callable[[str, str, int], Any],
    *,
    batch_size: int = 1,
    max_new_tokens: int | None = None,
) -> list[str]:
    """Greedy answers to lmms-eval ``generate_until`` requests, in request order.

    Each request's args are ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)``;
    its images (``doc_to_visual(doc(task, split, doc_id))``, PIL images) come before the context
    in one user turn (``<image>`` tags removed, as lmms-eval's Qwen2-VL classes do), answered by
    `generate_answers` with the model's chat template. Requests are batched by their generation
    settings; the answer is cut at the first of the task's ``until`` strings.

    Raises:
        ValueError: a visual that is not an image (a video path).
    """
    groups: dict[str, list[int]] = {}
    for i, args in enumerate(requests):
        groups.setdefault(json.dumps(args[1] or {}, sort_keys=True, default=str), []).append(i)
    text_config = model.config.get_text_config()
    prompt_room = int(getattr(text_config, "max_position_embeddings", 1 << 20))
    out = [""] * len(requests)
    for idx in groups.values():
        gen = dict(requests[idx[0]][1] or {})
        n = int(gen.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        examples = [_chat_example(requests[i], doc) for i in idx]
        answers = generate_answers(
            model,
            tokenizer,
            examples,
            max_new_tokens=min(n, max_new_tokens or n),
            max_length=prompt_room,
            batch_size=batch_size,
        )
        stops = gen.get("until") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        for i, answer in zip(idx, answers, strict=True):
            out[i] = _cut(answer.text, stops)
    return out


def _chat_example(args: tuple, doc: Callable[[str, str, int], Any]) -> dict:
    context, _gen, to_visual, doc_id, task, split = args[:6]
    visuals = to_visual(doc(task, split, doc_id)) if to_visual is not None else []
    visuals = visuals if isinstance(visuals, list) else [visuals]
    if len(visuals) == 1 and isinstance(visuals[0], list):
        visuals = visuals[0]  # [[img, ...]]
    bad = [v for v in visuals if not hasattr(v, "convert")]
    if bad:
        raise ValueError(f"{task}: only image inputs are supported, got {type(bad[0]).__name__}")
    text = context.replace("<image>", "")
    parts = [{"type": "image", "image": v.convert("RGB")} for v in visuals]
    content = [*parts, {"type": "text", "text": text}] if parts else text
    return {
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": ""}]
    }


def _cut(text: str, stops: Sequence[str]) -> str:
    for s in stops:
        if s:
            text = text.split(s)[0]
    return text.strip()


@contextlib.contextmanager
def judge_environment(judge: Mapping[str, Any] | None) -> Iterator[None]:
    """Set the environment variables lmms-eval's task modules read when they load (API_TYPE,
    MODEL_VERSION, the key, OPENAI_API_URL / AZURE_ENDPOINT, API_VERSION) from ``judge``;
    restore them on exit. Without a judge, nothing changes."""
    if judge is None:
        yield
        return
    api = judge.get("api_type", "openai")
    key_env = judge.get("api_key_env") or JUDGE_KEY_ENV[api]
    if not os.environ.get(key_env):
        raise ValueError(f"eval.lmms_eval.judge: ${key_env} (the judge's API key) is not set")
    values = {"API_TYPE": api, "MODEL_VERSION": judge["model"]}
    values[JUDGE_KEY_ENV[api]] = os.environ[key_env]
    if judge.get("api_base"):
        values["OPENAI_API_URL" if api == "openai" else "AZURE_ENDPOINT"] = judge["api_base"]
    if judge.get("api_version"):
        values["API_VERSION"] = judge["api_version"]
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def judge_record(judge: Mapping[str, Any] | None) -> dict | None:
    """What a score records of its judge: model, api_type, api_base (the provider's default URL
    when unset), api_version; never the key. None without a judge."""
    if judge is None:
        return None
    api = judge.get("api_type", "openai")
    record = {
        "model": judge["model"],
        "api_type": api,
        "api_base": judge.get("api_base") or DEFAULT_API_BASE.get(api),
    }
    return record | ({"api_version": judge["api_version"]} if judge.get("api_version") else {})


def harness_rows(out: Mapping[str, Any], label: str, judge: Mapping | None) -> pd.DataFrame:
    """``simple_evaluate``'s result as eval rows with a ``score`` per task (see `run_lmms_eval`)."""
    rows = results_rows(out, label)
    rows = rows.assign(split=LMMS_EVAL_SPLIT, family=rows["family"].replace("lm-eval", "lmms-eval"))
    n_docs = {t: v.get("effective", -1) for t, v in (out.get("n-samples") or {}).items()}
    scores = []
    for task in out["results"]:
        metric, scale = _headline(task, (out.get("configs") or {}).get(task, {}), rows)
        got = rows[(rows["source"] == task) & (rows["metric"] == metric)]["value"]
        err = rows[(rows["source"] == task) & (rows["metric"] == _stderr_name(metric))]["value"]
        if got.empty:
            log.warning("lmms-eval %s: no %s in its results (the score is NaN)", task, metric)
        family = rows.loc[rows["source"] == task, "family"]
        base = {
            "model": label,
            "source": task,
            "family": family.iloc[0] if len(family) else "lmms-eval",
            "split": LMMS_EVAL_SPLIT,
            "n": int(n_docs.get(task, -1)),
        }
        value = float(got.iloc[0]) * scale if len(got) else math.nan
        scores.append(base | {"metric": "score", "value": value})
        if len(err) and math.isfinite(err.iloc[0]):
            scores.append(base | {"metric": "score_stderr", "value": float(err.iloc[0]) * scale})
    table = pd.concat([rows, pd.DataFrame(scores, columns=COLUMNS)], ignore_index=True)
    record = judge_record(judge)
    table["judge"] = json.dumps(record, sort_keys=True) if record else ""
    return table


def _stderr_name(metric: str) -> str:
    name, _, filt = metric.partition("/")
    return f"{name}_stderr" + (f"/{filt}" if filt else "")


def _headline(task: str, config: Mapping[str, Any], rows: pd.DataFrame) -> tuple[str, float]:
    """The metric a task's score reports and its factor to 0-100 (see `run_lmms_eval`)."""
    if task in PAPER_BENCHMARKS:
        b = PAPER_BENCHMARKS[task]
        return b.metric, b.scale
    listed = config.get("metric_list") or []
    names = rows.loc[rows["source"] == task, "metric"]
    names = [m for m in names if "_stderr" not in m]
    if listed:
        first = listed[0]["metric"]
        name = next((m for m in names if m == first or m.startswith(first + "/")), first)
        return name, 100.0 if listed[0].get("aggregation") == "mean" else 1.0
    return (names[0] if names else "score"), 1.0


def summarize_lmms_eval(
    table: pd.DataFrame, order: Sequence[str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's table from the ``score`` rows: models × benchmarks (a `PAPER_BENCHMARKS`
    title, else the task name) plus ``average`` (NaN when a benchmark's score is missing), and
    the stderrs (NaN where lmms-eval gave none; none for the average). Empty without rows."""
    sub = table[(table["split"] == LMMS_EVAL_SPLIT)]
    if sub.empty:
        return pd.DataFrame(), pd.DataFrame()
    title = sub["source"].map(lambda t: PAPER_BENCHMARKS[t].title if t in PAPER_BENCHMARKS else t)
    sub = sub.assign(col=title)
    score = sub[sub["metric"] == "score"]
    values = score.pivot_table("value", "model", "col", sort=False, dropna=False)
    values = values.reindex(columns=list(dict.fromkeys(score["col"])))
    err = sub[sub["metric"] == "score_stderr"]
    stderr = err.pivot_table("value", "model", "col", sort=False).reindex_like(values)
    values["average"] = values.mean(axis=1, skipna=False)
    stderr["average"] = math.nan
    if order is not None:
        keep = [m for m in order if m in values.index]
        values, stderr = values.reindex(keep), stderr.reindex(keep)
    values.columns.name = stderr.columns.name = None
    return values, stderr


# ------------------------------------------------------------------------ load-time checks
def lmms_eval_task_problems(options: Mapping[str, Any] | None, evaluate: bool) -> list[str]:
    """``eval.lmms_eval``'s folder, task names and judge key, checked before any work.

    Task names resolve as the evaluate stage resolves them (`run_lmms_eval`'s TaskManager).
    Without lmms-eval installed: refused when the evaluate stage is to run; else the names are
    checked against `PAPER_BENCHMARKS` and the ``task:`` names of the YAMLs under
    ``include_path``, and a warning says so. When the evaluate stage runs with a judge, its key's
    environment variable must be set.
    """
    if not options or lmms_eval_problems(options):
        return []  # absent, or malformed: `EvalConfig` names what is wrong with its shape
    include = options.get("include_path")
    if include is not None and not Path(include).expanduser().is_dir():
        return [f"eval.lmms_eval.include_path: {include!r} is not a folder (of lmms-eval tasks)"]
    inc = str(Path(include).expanduser()) if include else None
    problems = []
    judge = options.get("judge")
    if evaluate and judge is not None:
        key_env = judge.get("api_key_env") or JUDGE_KEY_ENV[judge.get("api_type", "openai")]
        if not os.environ.get(key_env):
            problems.append(
                f"eval.lmms_eval.judge.api_key_env: ${key_env} is not set; the judge "
                f"{judge['model']!r} reads its API key from it"
            )
    if not _installed():
        if evaluate:
            return [*problems, f"eval.lmms_eval: lmms-eval is not installed: {INSTALL}"]
        known = frozenset(PAPER_BENCHMARKS) | _local_task_names(inc)
        where = "the paper's benchmarks" + (f" and the tasks in {include}" if include else "")
        log.warning(
            "eval.lmms_eval: lmms-eval is not installed; task names checked against %s only", where
        )
    else:
        known = _lmms_eval_tasks(inc, tuple(options["tasks"]))
        where = f"lmms-eval's tasks{f' and {include}' if include else ''}"
    for i, task in enumerate(options["tasks"]):
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=3)
            hint = f"; did you mean: {', '.join(close)}" if close else ""
            problems.append(f"eval.lmms_eval.tasks[{i}]: {task!r} is not among {where}{hint}")
    return problems


def _installed() -> bool:
    return importlib.util.find_spec("lmms_eval") is not None


@functools.lru_cache(maxsize=8)
def _lmms_eval_tasks(include: str | None, tasks: tuple[str, ...]) -> frozenset[str]:
    return frozenset(_task_manager(include, tasks).all_tasks)


_TASK_LINE = re.compile(r"""^task:\s*["']?([\w\-.]+)["']?\s*(#.*)?$""", re.MULTILINE)


def _local_task_names(include: str | None) -> frozenset[str]:
    """The ``task: <name>`` lines of the YAMLs under ``include`` (read as text: their
    ``!function`` tags need lmms-eval to load)."""
    if include is None:
        return frozenset()
    names = set()
    for path in Path(include).rglob("*.y*ml"):
        names.update(m.group(1) for m in _TASK_LINE.finditer(path.read_text(errors="replace")))
    return frozenset(names)
