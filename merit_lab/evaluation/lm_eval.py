"""lm-evaluation-harness on a model folder: its tasks' scores as rows of ``eval.parquet``.

Input: a HF model folder (or an already loaded model and tokenizer), task names, and optionally a
folder of task YAMLs (``include_path``: local tasks, e.g. ``dataset_path: json`` over a JSONL).
Output: a long table like `merit_lab.evaluation.evaluate.evaluate_model`'s (model, source = the
task,
family, split = "lm-eval", metric, value, n). lm-eval (``pip install 'lm-eval>=0.4'``) is
imported only when a run asks for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from merit_lab.config.fields import lm_eval_problems
from merit_lab.io import atomic_write_text

__all__ = [
    "LM_EVAL_SPLIT",
    "run_lm_eval",
    "summarize_lm_eval",
    "write_local_tasks",
]

LM_EVAL_SPLIT = "lm-eval"  # the `split` of lm-eval rows: apart from the mixture's held-out rows
COLUMNS = ["model", "source", "family", "split", "metric", "value", "n"]


def run_lm_eval(
    model_dir: str | Path,
    tasks: Sequence[str],
    *,
    label: str | None = None,
    include_path: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    apply_chat_template: bool = False,
    device: str = "cpu",
    model: Any = None,
    tokenizer: Any = None,
) -> pd.DataFrame:
    """Run lm-eval's ``simple_evaluate`` with its HF backend on one model.

    Args:
        model_dir: the HF model folder (loaded by lm-eval unless ``model`` is given).
        tasks: lm-eval task (or group) names.
        label: the ``model`` column (default: the folder's name).
        include_path: a folder of task YAMLs; only these are indexed (lm-eval's built-in tasks
            too when None).
        limit: at most this many documents per task.
        model, tokenizer: an already loaded model and its tokenizer (no second load).

    Returns:
        One row per (task, metric) and one ``<metric>_stderr`` row where lm-eval gives one;
        a filter other than "none" is kept in the metric name (``exact_match/strict-match``).
        ``n`` is the number of documents scored.

    Raises:
        ValueError: bad options, or a task name that lm-eval does not know (it names them).
        ImportError: lm-eval is not installed (the message says how to install it).
    """
    opts = {
        "tasks": list(tasks),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "batch_size": batch_size,
        "apply_chat_template": apply_chat_template,
    }
    problems = lm_eval_problems(opts)
    if problems:
        raise ValueError("; ".join(problems))
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"lm_eval.include_path: {include_path} is not a folder")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("lm-eval is not installed: pip install 'lm-eval>=0.4'") from e

    manager = TaskManager(
        include_path=str(include_path) if include_path else None,
        include_defaults=include_path is None,
    )
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise ValueError(f"lm-eval has no tasks {missing} (include_path={include_path})")
    if model is not None:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    else:
        lm = HFLM(pretrained=str(model_dir), device=device, batch_size=batch_size)
    out = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        apply_chat_template=apply_chat_template,
        log_samples=False,
        bootstrap_iters=1000,  # stderr of the metrics that need a bootstrap
    )
    return results_rows(out, label or Path(model_dir).name)


def results_rows(out: Mapping[str, Any], label: str) -> pd.DataFrame:
    """``simple_evaluate``'s result as eval rows (see `run_lm_eval`)."""
    groups = {t: g for g, members in (out.get("group_subtasks") or {}).items() for t in members}
    rows = []
    for task, metrics in out["results"].items():
        n = (out.get("n-samples") or {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # "alias", "name" and the like
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}/{filt}"
            rows.append(
                {
                    "model": label,
                    "source": task,
                    "family": groups.get(task, "lm-eval"),
                    "split": LM_EVAL_SPLIT,
                    "metric": name,
                    "value": float(value),
                    "n": int(n) if n is not None else -1,
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def summarize_lm_eval(
    table: pd.DataFrame, order: Sequence[str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The lm-eval rows of an eval table as models × "<task> <metric>" (values, stderrs).

    Returns:
        Two frames of one shape (empty without lm-eval rows); a stderr lm-eval did not give is
        NaN.
    """
    sub = table[table["split"] == LM_EVAL_SPLIT]
    if sub.empty:
        return pd.DataFrame(), pd.DataFrame()
    err = sub["metric"].str.endswith("_stderr")
    col = sub["source"] + " " + sub["metric"].str.removesuffix("_stderr")
    values = sub[~err].assign(col=col[~err]).pivot_table("value", "model", "col", sort=False)
    stderr = sub[err].assign(col=col[err]).pivot_table("value", "model", "col", sort=False)
    stderr = stderr.reindex(index=values.index, columns=values.columns)
    if order is not None:
        keep = [m for m in order if m in values.index]
        values, stderr = values.reindex(keep), stderr.reindex(keep)
    values.columns.name = stderr.columns.name = None
    return values, stderr


def write_local_tasks(
    examples: Mapping[str, Sequence[dict]],
    folder: str | Path,
    *,
    prefix: str = "local",
    choices: int = 4,
    max_gen_toks: int = 32,
    seed: int = 0,
) -> list[str]:
    """Two lm-eval tasks over held-out chat examples, as JSONL + task YAMLs in ``folder``.

    ``<prefix>_gen`` (generate_until, exact match of the greedy answer) and ``<prefix>_mc``
    (multiple_choice, loglikelihood of the right answer against ``choices - 1`` other answers
    of the same source, drawn with ``seed``). Both read ``dataset_path: json`` with
    ``dataset_kwargs.data_files``, so nothing is fetched from a hub.

    Args:
        examples: source → examples (``{"messages": [...]}``, the last turn the answer).

    Returns:
        The task names, to pass with ``include_path=folder``.
    """
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    gen, mc = [], []
    for source, exs in examples.items():
        answers = [ex["messages"][-1]["content"] for ex in exs]
        for i, ex in enumerate(exs):
            prompt = next(m["content"] for m in ex["messages"] if m["role"] == "user")
            gen.append({"source": source, "prompt": prompt, "answer": answers[i]})
            others = sorted({a for a in answers if a != answers[i]})
            if len(others) < choices - 1:
                raise ValueError(f"{source}: fewer than {choices} distinct answers for a choice")
            picks = [others[j] for j in rng.choice(len(others), choices - 1, replace=False)]
            gold = int(rng.integers(choices))
            mc.append(
                {
                    "source": source,
                    "prompt": prompt,
                    "gold": gold,
                    "choices": [*picks[:gold], answers[i], *picks[gold:]],
                }
            )
    names = []
    for kind, docs in (("gen", gen), ("mc", mc)):
        data = (folder / f"{prefix}_{kind}.jsonl").resolve()
        atomic_write_text(data, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
        task = {
            "task": f"{prefix}_{kind}",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "doc_to_text": "{{prompt}}",
            "target_delimiter": "",
        }
        if kind == "gen":
            task |= {
                "output_type": "generate_until",
                "doc_to_target": "{{answer}}",
                "generation_kwargs": {
                    "until": ["<|end|>", "\n"],
                    "do_sample": False,
                    "max_gen_toks": max_gen_toks,
                },
                "metric_list": [
                    {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
                ],
            }
        else:
            task |= {
                "output_type": "multiple_choice",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{gold}}",
                "metric_list": [
                    {"metric": m, "aggregation": "mean", "higher_is_better": True}
                    for m in ("acc", "acc_norm")
                ],
            }
        atomic_write_text(folder / f"{prefix}_{kind}.yaml", yaml.safe_dump(task, sort_keys=False))
        names.append(task["task"])
    return names
