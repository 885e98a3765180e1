from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from merit_lab.data.mixture import MixtureError, load_mixture
from tests.conftest import chat, write_jsonl


def test_folder_of_jsonl_splits_deterministically(tiny_mixture_dir: Path):
    a = load_mixture(tiny_mixture_dir, calibration_n=5, eval_fraction=0.25, seed=3)
    b = load_mixture(tiny_mixture_dir, calibration_n=5, eval_fraction=0.25, seed=3)
    assert a.names == ("src0_add", "src1_sub", "src2_max", "src3_min")
    for s, t in zip(a, b, strict=True):
        assert (len(s.train), len(s.calibration), len(s.eval)) == (9, 5, 3)
        assert s.train == t.train and s.eval == t.eval and s.calibration == t.calibration
        ids = lambda xs: {x["id"] for x in xs}  # noqa: E731
        assert not ids(s.eval) & ids(s.train)  # held out
        assert ids(s.calibration) <= ids(s.train)  # calibration comes from training data
    c = load_mixture(tiny_mixture_dir, calibration_n=5, eval_fraction=0.25, seed=4)
    assert any(s.eval != t.eval for s, t in zip(a, c, strict=True))


def test_adding_a_source_keeps_the_others_splits(tiny_mixture_dir: Path):
    before = load_mixture(tiny_mixture_dir, eval_fraction=0.25)
    write_jsonl(tiny_mixture_dir / "zz_new.jsonl", [chat(f"q{i}", f"a{i}") for i in range(6)])
    after = load_mixture(tiny_mixture_dir, eval_fraction=0.25)
    assert after.names[-1] == "zz_new"
    for s in before:
        assert after[s.name].eval == s.eval and after[s.name].calibration == s.calibration


def test_explicit_split_folders_and_metadata(tmp_path: Path):
    for sp, n in [("train", 6), ("calibration", 3), ("eval", 2)]:
        for src in ("a", "b"):
            write_jsonl(tmp_path / sp / f"{src}.jsonl", [chat(f"{src}{i}", "x") for i in range(n)])
    (tmp_path / "sources.json").write_text('{"sources": {"a": {"family": "f1"}, "b": {}}}')
    m = load_mixture(tmp_path)
    assert [(len(s.train), len(s.calibration), len(s.eval)) for s in m] == [(6, 3, 2)] * 2
    assert m["a"].metadata == {"family": "f1"}
    assert m.metadata_table()[0] == {
        "source": "a",
        "n_train": 6,
        "n_calibration": 3,
        "n_eval": 2,
        "family": "f1",
    }


def test_single_file_with_source_column_jsonl_and_parquet(tmp_path: Path):
    recs = [{"source": f"s{i % 3}", "prompt": f"p{i}", "response": f"r{i}"} for i in range(30)]
    write_jsonl(tmp_path / "all.jsonl", recs)
    pd.DataFrame(recs).to_parquet(tmp_path / "all.parquet")
    for f in ("all.jsonl", "all.parquet"):
        m = load_mixture(tmp_path / f, eval_fraction=0.2)
        assert m.names == ("s0", "s1", "s2")
        assert sum(len(s.train) + len(s.eval) for s in m) == 30
        msgs = m["s0"].train[0]["messages"]
        assert [x["role"] for x in msgs] == ["user", "assistant"]


def test_parquet_folder_with_messages(tmp_path: Path):
    recs = [chat(f"p{i}", f"r{i}") for i in range(8)]
    (tmp_path / "mix").mkdir()
    pd.DataFrame(recs).to_parquet(tmp_path / "mix" / "alpha.parquet")
    m = load_mixture(tmp_path / "mix")
    assert m.names == ("alpha",) and len(m["alpha"].train) + len(m["alpha"].eval) == 8
    assert m["alpha"].train[0]["messages"][1]["role"] == "assistant"


def test_datasets_saved_to_disk(tmp_path: Path):
    import datasets

    recs = [{"source": f"s{i % 2}", "prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "ds"))
    m = load_mixture(tmp_path / "ds", eval_fraction=0.2)
    assert m.names == ("s0", "s1")
    with pytest.raises(MixtureError, match="no source column 'task'"):
        load_mixture(tmp_path / "ds", source_column="task")


def test_unknown_hub_name_gives_a_clear_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network retries in tests
    with pytest.raises(MixtureError, match="not a local folder or file"):
        load_mixture("no-such-org/no-such-dataset-xyz")


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}', r"bad\.jsonl:2: malformed JSON"),
        ('{"question": "hi", "answer": "x"}', r"bad\.jsonl:2: example has neither 'messages'"),
        ('{"prompt": "hi"}', r"bad\.jsonl:2: missing or non-string field 'response'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', r"bad\.jsonl:2: no assistant"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', r"bad\.jsonl:2: .*unknown role"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, line: str, match: str):
    good = '{"prompt": "a", "response": "b"}'
    (tmp_path / "bad.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(MixtureError, match=match):
        load_mixture(tmp_path)


def test_empty_source_and_duplicate_names(tmp_path: Path):
    write_jsonl(tmp_path / "a" / "x.jsonl", [chat("p", "r")])
    (tmp_path / "a" / "empty.jsonl").write_text("\n")
    with pytest.raises(MixtureError, match="'empty'.*is empty"):
        load_mixture(tmp_path / "a")
    write_jsonl(tmp_path / "b" / "x.jsonl", [chat("p", "r")])
    pd.DataFrame([chat("p", "r")]).to_parquet(tmp_path / "b" / "x.parquet")
    with pytest.raises(MixtureError, match="duplicate source name 'x'"):
        load_mixture(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("x")
    # No .jsonl/.parquet sources: the folder goes to `datasets` (text builder), which has no
    # source column; the error says so.
    with pytest.raises(MixtureError, match="no source column 'source'"):
        load_mixture(tmp_path / "c")


def test_demo_mixture_loads():
    m = load_mixture("demo")
    assert len(m) >= 32
    families = {s.metadata["family"] for s in m}
    assert len(families) >= 4
    assert all(len(s.calibration) >= 200 and s.eval and s.train for s in m)
