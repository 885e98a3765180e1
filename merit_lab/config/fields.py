"""Field checks shared by the config dataclasses: a problem per bad value, named by key path.

`coerce` reads a YAML value as a field's annotated type; the others return problem lines that
`merit_lab.config.schema` joins into one error naming each key.
"""

from __future__ import annotations

import fnmatch
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "JUDGED_TASKS",
    "JUDGE_KEYS",
    "JUDGE_KEY_ENV",
    "LMMS_EVAL_KEYS",
    "LM_EVAL_KEYS",
    "below",
    "coerce",
    "global_batch_problem",
    "join_key",
    "judged_task",
    "lm_eval_problems",
    "lmms_eval_problems",
    "not_one_of",
    "refuse",
    "unless",
]


def refuse(problems: list[str]) -> None:
    """One ValueError, a line per problem (``field: what is wrong``); the config adds the path."""
    if problems:
        raise ValueError("\n".join(problems))


def below(obj: Any, low: float, *names: str) -> list[str]:
    """A problem for each named field (None: unset, skipped) under ``low``."""
    values = {n: getattr(obj, n) for n in names}
    return [
        f"{n}: must be >= {low}, got {v!r}" for n, v in values.items() if v is not None and v < low
    ]


def unless(ok: bool, problem: str) -> list[str]:
    return [] if ok else [problem]


def not_one_of(name: str, what: str, value: Any, choices: typing.Iterable[str]) -> list[str]:
    choices = list(choices)
    listed = ", ".join(choices)
    return unless(
        value in choices, f"{name}: unknown {what} {value!r}; {what} must be one of: {listed}"
    )


def global_batch_problem(batch_size: int, grad_accum: int, procs: int) -> str | None:
    """Why ``procs`` processes cannot share a global batch of ``batch_size x grad_accum``
    examples (None: they can), as the text that follows the count ("divides neither ...").

    The rule of `merit_lab.training.distributed.split_global_batch`: each process takes a
    ``1/procs`` share of the accumulation steps or of the micro-batch, so ``procs`` must divide
    one of them. `TrainConfig` applies it when the config loads, not when a branch starts.
    """
    if procs < 1 or grad_accum % procs == 0 or batch_size % procs == 0:
        return None  # procs < 1 is refused by its own range check
    return (
        f"divides neither grad_accum={grad_accum} nor "
        f"batch_size={batch_size}: the global batch of {batch_size * grad_accum} examples per "
        "optimizer step cannot be split evenly; pick a count that divides one of them"
    )


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def join_key(where: str, rest: str, sep: str = ".") -> str:
    return f"{where}{sep}{rest}" if where else rest


def coerce(value: Any, hint: Any, path: str, problems: list[str]) -> Any:
    """``value`` as the annotated type ``hint`` (int, float, bool, str, X | None, tuple[X, ...],
    dict); a problem is appended when it is not one. A float field takes an int as it is (so
    hashes of existing configs do not move) and a numeric string as a float: YAML 1.1 reads
    ``1e-3`` (no dot) as the string "1e-3"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return coerce(value, hint, path, problems)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            example = f", e.g. [{value}]" if isinstance(value, (str, int, float)) else ""
            problems.append(f"{path}: expected a list{example}, got {value!r}")
            return value
        return tuple(coerce(v, args[0], f"{path}[{i}]", problems) for i, v in enumerate(value))
    expected = {
        dict: "a mapping",
        bool: "true or false",
        str: "a string",
        float: "a number",
        int: "an integer",
    }[origin or hint]
    if (origin or hint) in (dict, bool, str) and isinstance(value, origin or hint):
        return value
    if hint in (int, float) and not isinstance(value, bool):
        number = value
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            number = float(value)
        if isinstance(number, (int, float)) and math.isfinite(number):
            if hint is float:
                return value if isinstance(value, (int, float)) else number
            if isinstance(number, int) or number.is_integer():
                return int(number)
    problems.append(f"{path}: expected {expected}, got {value!r}")
    return value


# eval.lm_eval keys: tasks (required), include_path (a folder of task YAMLs), limit (documents
# per task), num_fewshot, batch_size, apply_chat_template (format prompts with the chat template)
LM_EVAL_KEYS = (
    "tasks",
    "include_path",
    "limit",
    "num_fewshot",
    "batch_size",
    "apply_chat_template",
)


def _harness_problems(
    options: Mapping[str, Any], name: str, keys: Sequence[str], floors: Mapping[str, int]
) -> tuple[list[str], bool]:
    """The shape ``eval.lm_eval`` and ``eval.lmms_eval`` share: known ``keys``, a non-empty list
    of task names, ``include_path`` a folder path, each of ``floors`` an integer >= its floor.
    Returns the problems, one line each, and whether the task list is well formed."""
    out = []
    unknown = sorted(set(options) - set(keys))
    if unknown:
        out.append(f"{name}: unknown keys {unknown}; known: {list(keys)}")
    tasks = options.get("tasks")
    tasks_ok = isinstance(tasks, (list, tuple)) and bool(tasks)
    tasks_ok = tasks_ok and all(isinstance(t, str) for t in tasks)
    if not tasks_ok:
        out.append(f"{name}.tasks: give a list of task names, got {tasks!r}")
    inc = options.get("include_path")
    if inc is not None and not isinstance(inc, str):
        out.append(f"{name}.include_path: expected a folder path, got {inc!r}")
    for key, low in floors.items():
        v = options.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            out.append(f"{name}.{key}: expected an integer >= {low}, got {v!r}")
    return out, tasks_ok


def lm_eval_problems(options: Mapping[str, Any] | None) -> list[str]:
    """What is wrong with an ``eval.lm_eval`` mapping (empty when fine or None), one line each."""
    if options is None:
        return []
    if not isinstance(options, Mapping):
        return [f"lm_eval: expected a mapping with {list(LM_EVAL_KEYS)}, got {options!r}"]
    floors = {"limit": 1, "num_fewshot": 0, "batch_size": 1}
    out, _ = _harness_problems(options, "lm_eval", LM_EVAL_KEYS, floors)
    chat = options.get("apply_chat_template")
    if chat is not None and not isinstance(chat, bool):
        out.append(f"lm_eval.apply_chat_template: expected true or false, got {chat!r}")
    return out


# eval.lmms_eval keys: tasks (required), include_path (a folder of lmms-eval task folders: a YAML
# and its utils.py each), limit (documents per task), batch_size (prompts per generate call),
# max_new_tokens (a cap on every task's answer length), judge (the LLM that grades judged tasks)
LMMS_EVAL_KEYS = ("tasks", "include_path", "limit", "batch_size", "max_new_tokens", "judge")
# judge keys: model (required; lmms-eval's MODEL_VERSION), api_type (its API_TYPE), api_base (the
# API's URL; the provider's default when unset), api_key_env (the environment variable holding
# the key, never the key itself), api_version (Azure only)
JUDGE_KEYS = ("model", "api_type", "api_base", "api_key_env", "api_version")
JUDGE_KEY_ENV = {"openai": "OPENAI_API_KEY", "azure": "AZURE_API_KEY"}  # api_type → default
# Tasks lmms-eval (0.7) scores through an LLM judge (fnmatch patterns → what the judge does);
# without one it would send unauthenticated requests and score failures, or guess at random.
JUDGED_TASKS = {
    "llava_in_the_wild*": "GPT rates each answer against a reference answer",
    "mmvet*": "GPT grades each answer",
    "mathvista*": "GPT extracts the answer from each response",
    "mmbench_*": (
        "GPT matches a response to an option when no letter can be parsed, and guesses at "
        "random when that fails; mmbench_en_dev_static parses without a judge"
    ),
}


def judged_task(task: str) -> str | None:
    """What the LLM judge does for ``task`` (None: the task is scored without one)."""
    if task.endswith("_static"):  # lmms-eval's judge-free variants (mmbench_en_dev_static)
        return None
    return next((why for pat, why in JUDGED_TASKS.items() if fnmatch.fnmatchcase(task, pat)), None)


def lmms_eval_problems(options: Mapping[str, Any] | None) -> list[str]:
    """What is wrong with an ``eval.lmms_eval`` mapping (empty when fine or None), one line each:
    its shape, and every judged task (`JUDGED_TASKS`) when no ``judge`` is set."""
    if options is None:
        return []
    if not isinstance(options, Mapping):
        return [f"lmms_eval: expected a mapping with {list(LMMS_EVAL_KEYS)}, got {options!r}"]
    floors = {"limit": 1, "batch_size": 1, "max_new_tokens": 1}
    out, tasks_ok = _harness_problems(options, "lmms_eval", LMMS_EVAL_KEYS, floors)
    tasks = options["tasks"] if tasks_ok else []
    if len(set(tasks)) < len(tasks):
        out.append(f"lmms_eval.tasks: a task is named twice in {list(tasks)}")
    judge = options.get("judge")
    out += _judge_problems(judge)
    judged = [(t, why) for t in tasks if (why := judged_task(t))]
    if judge is None:
        out += [
            f"lmms_eval.tasks: {t!r} is scored by an LLM judge ({why}) and no judge is "
            "configured: set eval.lmms_eval.judge: {model: gpt-4o-2024-11-20} with the key in "
            "$OPENAI_API_KEY, or drop the task"
            for t, why in judged
        ]
    elif isinstance(judge, Mapping) and judge.get("api_base") is not None:
        mmbench = [t for t, _ in judged if t.startswith("mmbench_")]
        if mmbench and len(judged) > len(mmbench):
            out.append(
                f"lmms_eval.judge.api_base: lmms-eval reads it (OPENAI_API_URL) as the full "
                f"chat/completions URL for {mmbench} but as the /v1 base for the other judged "
                "tasks; evaluate MMBench in a config of its own"
            )
    return out


def _judge_problems(judge: Any) -> list[str]:
    if judge is None:
        return []
    if not isinstance(judge, Mapping):
        return [f"lmms_eval.judge: expected a mapping with {list(JUDGE_KEYS)}, got {judge!r}"]
    out = []
    unknown = sorted(set(judge) - set(JUDGE_KEYS))
    if unknown:
        out.append(f"lmms_eval.judge: unknown keys {unknown}; known: {list(JUDGE_KEYS)}")
    if not (isinstance(judge.get("model"), str) and judge["model"]):
        got = judge.get("model")
        out.append(f"lmms_eval.judge.model: give the judge's model name, got {got!r}")
    api = judge.get("api_type", "openai")
    if api not in JUDGE_KEY_ENV:
        out.append(f"lmms_eval.judge.api_type: expected one of {list(JUDGE_KEY_ENV)}, got {api!r}")
    for key in ("api_base", "api_version"):
        if judge.get(key) is not None and not isinstance(judge[key], str):
            out.append(f"lmms_eval.judge.{key}: expected a string, got {judge[key]!r}")
    if api == "azure" and judge.get("api_base") is None:
        out.append("lmms_eval.judge.api_base: an Azure judge needs its endpoint URL")
    if api == "openai" and judge.get("api_version") is not None:
        out.append("lmms_eval.judge.api_version: only an Azure judge takes one")
    env = judge.get("api_key_env")
    if env is not None and not (isinstance(env, str) and re.fullmatch(r"[A-Za-z_]\w*", env)):
        out.append(
            f"lmms_eval.judge.api_key_env: give the name of the environment variable that holds "
            f"the key (never the key), got {env!r}"
        )
    return out
