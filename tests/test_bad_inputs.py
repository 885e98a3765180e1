"""The bad-input corpus: every case in ``tests/bad_inputs/<NN-name>/`` gets ONE clear error from
the ``merit-lab`` command, naming the file (and line, source or key) and what to do, before any
work is lost: every file of the inputs and of the run directory is byte-identical afterwards.

A case is data: ``case.yaml`` says what it breaks (``kind: fresh``, a demo slice in ``data/``
and no run yet; ``kind: run``, a copy of a small finished run), the command and the message
fragments; ``files/`` holds literal inputs (a non-UTF-8 file is committed as bytes). The
operations a case may apply are the keys of `OPS`; ``{work}``, ``{data}``, ``{run}``,
``{model}`` and ``{base}`` in any string are replaced by the case's paths.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from merit_lab.cli import main
from merit_lab.config.schema import load_config
from tests.conftest import write_demo_slice

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = sorted(p.name for p in CORPUS.iterdir() if (p / "case.yaml").is_file())
KEYS = {
    "what",
    "category",
    "kind",
    "config",
    "config_text",
    "setup",
    "prepare",
    "break",
    "command",
    "expect",
    "lines",
    "xfail",
}
CATEGORIES = {"data", "config", "model", "checkpoint", "partition", "bank", "run"}
SOURCES = [
    "reverse-a-terse-lower",
    "reverse-a-verbose-upper",
    "shift-a-terse-upper",
    "shift-a-verbose-lower",
]
BASE_CONFIG = {
    "name": "tiny",
    "calibration": {"n": 4, "micro_batch_size": 4},
    "sketch": {"dim": 1024},
    "partition": {"method": "balanced", "r": 1},
    "train": {"batch_size": 8, "lr": 1e-3, "save_steps": 50, "max_length": 64},
    "experiments": [{"name": "merit-1d", "merges": ["linear"]}],
    "eval": {"max_examples": 1, "max_new_tokens": 4},
}


def _load_case(name: str) -> dict:
    return yaml.safe_load((CORPUS / name / "case.yaml").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------ the operations
def _safetensors_edit(path: Path, key: str, change: str) -> None:
    """Rewrite one tensor of a safetensors file: ``nan``, ``perturb`` (other finite values),
    ``halve`` (its first dimension) or ``extra`` (a new tensor beside it); the metadata is kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    t = tensors[key].clone()
    if change == "nan":
        t.view(-1)[0] = float("nan")
        tensors[key] = t
    elif change == "perturb":
        tensors[key] = t * 1.01
    elif change == "halve":
        tensors[key] = t[: t.shape[0] // 2].contiguous()
    else:
        tensors[f"{key}.extra"] = t
    save_file(tensors, str(path), metadata=meta)


def _set_json(path: Path, key: str, value: object) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    *parents, last = key.split(".")
    node = data
    for k in parents:
        node = node[k]
    node[last] = value
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _drop_source(path: Path, source: str) -> None:
    """Remove a source from a partition.json: its group, its counts (a consistent document)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["groups"] = [[s for s in g if s != source] for g in data["groups"]]
    for what in ("examples", "tokens"):
        data[what].pop(source)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(text)


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _corrupt_header(path: Path) -> None:
    """Garble the JSON header of a safetensors file (its first bytes after the length)."""
    data = bytearray(path.read_bytes())
    data[8:24] = b"#not-a-header!!#"
    path.write_bytes(bytes(data))


def _to_parquet(src: Path, dst: Path) -> None:
    import pandas as pd

    records = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()]
    pd.DataFrame(records).to_parquet(dst, index=False)


def _live_lock(path: Path) -> None:
    """A lock held by a live process of this host: the test's parent (a shell or pytest's
    runner), which outlives the case."""
    import socket

    holder = {
        "pid": os.getppid(),
        "host": socket.gethostname(),
        "started": "2026-01-05T09:30",
        "command": "merit-lab run other.yaml",
    }
    path.write_text(json.dumps(holder), encoding="utf-8")


OPS = {
    "append": lambda w, a: _append(w(a["append"]), a["text"]),
    "write": lambda w, a: w(a["write"]).write_text(a["text"], encoding="utf-8"),
    "replace": lambda w, a: w(a["replace"]).write_text(
        w(a["replace"]).read_text(encoding="utf-8").replace(a["old"], a["new"]), encoding="utf-8"
    ),
    "delete": lambda w, a: [
        shutil.rmtree(p) if p.is_dir() else p.unlink() for p in sorted(w(".").glob(a["delete"]))
    ],
    "rename": lambda w, a: w(a["rename"]).rename(w(a["to"])),
    "copy": lambda w, a: shutil.copytree(w(a["copy"]), w(a["to"])),
    "mkdir": lambda w, a: w(a["mkdir"]).mkdir(parents=True),
    "truncate": lambda w, a: _truncate(w(a["truncate"]), a["keep"]),
    "corrupt_header": lambda w, a: _corrupt_header(w(a["corrupt_header"])),
    "tensor": lambda w, a: _safetensors_edit(w(a["tensor"]), a["key"], a["change"]),
    "set_json": lambda w, a: _set_json(w(a["set_json"]), a["key"], a["value"]),
    "drop_source": lambda w, a: _drop_source(w(a["drop_source"]), a["source"]),
    "to_parquet": lambda w, a: _to_parquet(w(a["to_parquet"]), w(a["to"])),
    "live_lock": lambda w, a: _live_lock(w(a["live_lock"])),
}


# --------------------------------------------------------------------------------- the setting
def _fill(value, paths: dict[str, str]):
    """``value`` with every ``{name}`` of ``paths`` replaced, in strings, lists and mappings."""
    if isinstance(value, str):
        for name, path in paths.items():
            value = value.replace("{" + name + "}", path)
        return value
    if isinstance(value, list):
        return [_fill(v, paths) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, paths) for k, v in value.items()}
    return value


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots``."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The demo slice every fresh case copies: 4 sources x 8 train, 4 calibration, 2 eval."""
    root = tmp_path_factory.mktemp("bad-inputs")
    write_demo_slice(root / "data", SOURCES, {"train": 8, "calibration": 4, "eval": 2})
    return root


@pytest.fixture(scope="module")
def built_run(shared) -> Path:
    """ONE small finished run (mixture → gradients → conflict → partition → train → merge of
    two branches) that every ``kind: run`` case copies; ~10 s on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg_path = shared / "run.yaml"
    cfg = {**BASE_CONFIG, "mixture": str(shared / "data"), "output_dir": str(shared / "runs")}
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(cfg_path), "--until", "partition"]) == 0
    assert main(["run", str(cfg_path), "--stages", "train", "merge"]) == 0
    torch.set_num_threads(threads)
    return shared / "runs" / "tiny"


def _prepare(name: str, case: dict, shared: Path, work: Path, request) -> dict[str, str]:
    """Lay out the case's work folder (data, config, run copy, files/); returns its paths."""
    from merit_lab.demo import DEMO_DIR

    paths = {
        "work": str(work),
        "run": str(work / "runs" / "tiny"),
        "model": str(work / "model"),
        "base": str(DEMO_DIR / "base"),
        "data": str(work / "data"),
    }
    if case["kind"] == "run":
        shutil.copytree(request.getfixturevalue("built_run"), work / "runs" / "tiny")
        paths["data"] = str(shared / "data")  # the run's own mixture: read, never changed
    else:
        shutil.copytree(shared / "data", work / "data")
    cfg = {**BASE_CONFIG, "mixture": paths["data"], "output_dir": str(work / "runs")}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    if case["kind"] == "run":  # what run_pipeline would save for this copy: a no-op rewrite
        load_config(work / "config.yaml").save(work / "runs" / "tiny" / "config.yaml")
    if (CORPUS / name / "files").is_dir():
        shutil.copytree(CORPUS / name / "files", work, dirs_exist_ok=True)
    if "config" in case:
        cfg = _merge(cfg, _fill(case["config"], paths))
        (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    if "config_text" in case:
        (work / "config.yaml").write_text(case["config_text"])
    _apply(case.get("setup", []), work, paths)
    if case.get("prepare"):  # a stage run on the unbroken inputs, before the break
        assert main(_fill(case["prepare"], paths)) == 0
    _apply(case.get("break", []), work, paths)
    return paths


def _apply(ops: list[dict], work: Path, paths: dict[str, str]) -> None:
    for op in _fill(ops, paths):
        (verb,) = [k for k in op if k in OPS]
        OPS[verb](lambda rel: work / rel, op)


# ----------------------------------------------------------------------------------- the tests
def test_the_corpus_covers_every_kind_of_input():
    cases = [_load_case(n) for n in CASES]
    assert len(cases) >= 40
    assert {c["category"] for c in cases} == CATEGORIES
    for name, case in zip(CASES, cases, strict=True):
        assert case["kind"] in ("fresh", "run") and case["expect"] and case["what"], name
        assert set(case) <= KEYS, (name, set(case) - KEYS)


@pytest.mark.parametrize("name", CASES)
def test_a_bad_input_gets_one_clear_error_before_any_work(name, shared, tmp_path, request, capsys):
    case = _load_case(name)
    if case.get("xfail"):
        request.applymarker(pytest.mark.xfail(reason=case["xfail"], strict=True))
    work = tmp_path / "work"
    work.mkdir()
    paths = _prepare(name, case, shared, work, request)
    roots = [work, *([Path(paths["data"])] if case["kind"] == "run" else [])]
    before = _snapshot(*roots)
    capsys.readouterr()
    command = _fill(
        case.get("command", ["run", "{work}/config.yaml", "--stages", "mixture"]), paths
    )
    code = main(command)  # an exception escaping here would be a traceback for the user
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("merit-lab: error: ")]
    assert code == 2, err
    assert len(errors) == case.get("lines", 1), err
    for fragment in _fill(case["expect"], paths):
        assert fragment in err, (fragment, err)
    after = _snapshot(*roots)
    created = sorted(set(after) - set(before))
    # a fresh run's config.yaml and launch.json (where it was started) are written first
    fresh = [str(work / "runs" / "tiny" / n) for n in ("config.yaml", "launch.json")]
    fresh_config = fresh if case["kind"] == "fresh" else []
    assert created in ([], fresh_config), created  # a lock is gone on exit; nothing else is new
    assert {p: h for p, h in after.items() if p in before} == before  # nothing touched


def test_the_unbroken_setting_works(shared, tmp_path, request):
    """The errors come from the breaks: the same setting, unbroken, passes the mixture stage."""
    work = tmp_path / "work"
    work.mkdir()
    _prepare("control", {"kind": "fresh"}, shared, work, request)
    assert main(["run", str(work / "config.yaml"), "--stages", "mixture"]) == 0
