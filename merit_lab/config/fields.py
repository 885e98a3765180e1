"""Field checks shared by the config dataclasses: a problem per bad value, named by key path.

`coerce` reads a YAML value as a field's annotated type; the others return problem lines that
`merit_lab.config.schema` joins into one error naming each key.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

__all__ = [
    "LM_EVAL_KEYS",
    "below",
    "coerce",
    "join_key",
    "lm_eval_problems",
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


def lm_eval_problems(options: Mapping[str, Any] | None) -> list[str]:
    """What is wrong with an ``eval.lm_eval`` mapping (empty when fine or None), one line each."""
    if options is None:
        return []
    if not isinstance(options, Mapping):
        return [f"lm_eval: expected a mapping with {list(LM_EVAL_KEYS)}, got {options!r}"]
    out = []
    unknown = sorted(set(options) - set(LM_EVAL_KEYS))
    if unknown:
        out.append(f"lm_eval: unknown keys {unknown}; known: {list(LM_EVAL_KEYS)}")
    tasks = options.get("tasks")
    if not (isinstance(tasks, (list, tuple)) and tasks and all(isinstance(t, str) for t in tasks)):
        out.append(f"lm_eval.tasks: give a list of task names, got {tasks!r}")
    inc = options.get("include_path")
    if inc is not None and not isinstance(inc, str):
        out.append(f"lm_eval.include_path: expected a folder path, got {inc!r}")
    for key, low in (("limit", 1), ("num_fewshot", 0), ("batch_size", 1)):
        v = options.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            out.append(f"lm_eval.{key}: expected an integer >= {low}, got {v!r}")
    chat = options.get("apply_chat_template")
    if chat is not None and not isinstance(chat, bool):
        out.append(f"lm_eval.apply_chat_template: expected true or false, got {chat!r}")
    return out
