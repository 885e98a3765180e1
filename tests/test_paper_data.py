"""The paper's data, offline: `merit-lab fetch-data vision-flan` and `fetch-data flan` on fixtures
in the upstream layouts (served through a stand-in for the one function that opens URLs), the
resumable download, the mixture-level overlap checks, and the two paper configs.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import urllib.error
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from merit_lab import cache
from merit_lab.cli import main
from merit_lab.data.checks import mixture_overlaps, read_hash_list, write_hash_list
from merit_lab.data.mixture import Source, load_mixture
from merit_lab.data.multimodal import image_bytes, load_image
from merit_lab.data.vision_flan import (
    ANNOTATION_FILE,
    BENCHMARK_TASKS,
    IMAGES_FILE,
    VISION_FLAN_REPO,
    escape_member,
    paper_tasks,
    unescape_member,
)

REPO = Path(__file__).resolve().parents[1]
DEMO_VL_BASE = REPO / "data" / "demo-vl" / "base"
VF = f"{cache.HUB_URL}/datasets/{VISION_FLAN_REPO}/resolve/main/"
FLAN = f"{cache.HUB_URL}/datasets/Muennighoff/flan/resolve/main/"
FLAN_TREE = f"{cache.HUB_URL}/api/datasets/Muennighoff/flan/tree/main/train"
# Vision-FLAN's own task names (the fixture keeps four, one with a non-ASCII picture name)
TASKS = (
    "VQA-E+visual_question_answering",
    "PACS+guitar_image_category_classification",
    "coco+image_classification_animal",
    "semart+image_type",
)
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


class _Response(io.BytesIO):
    """What `cache._open_url` returns: status, headers, read (optionally cut after ``cut``)."""

    def __init__(self, data: bytes, status: int, headers: dict, cut: int | None = None):
        super().__init__(data)
        self.status, self.headers, self.cut = status, headers, cut

    def read(self, n: int = -1) -> bytes:
        if self.cut is not None and self.tell() >= self.cut:
            raise ConnectionResetError("connection reset by the stand-in server")
        if self.cut is not None:
            n = min(n if n >= 0 else self.cut, self.cut - self.tell())
        return super().read(n)


class FakeHub:
    """A stand-in for the hub: URL → bytes, HTTP Range honoured; ``cut_once[url] = n`` ends the
    first response of ``url`` with a reset after n bytes. Every request is logged."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.cut_once, self.requests = files, {}, []

    def __call__(self, request, timeout):
        url, rng = request.full_url, request.headers.get("Range")
        self.requests.append((url, rng))
        if url not in self.files:
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        data, start = self.files[url], 0
        if rng:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                raise urllib.error.HTTPError(url, 416, "Range Not Satisfiable", {}, None)
        body = data[start:]
        headers = {"Content-Length": str(len(body))}
        if rng:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        return _Response(body, 206 if rng else 200, headers, self.cut_once.pop(url, None))


def _png(colour: tuple[int, int, int], mark: int = 0) -> bytes:
    arr = np.zeros((32, 32, 3), np.uint8) + np.array(colour, np.uint8)
    arr[mark % 32, :] = 255  # a line per picture, so no two pictures share their bytes
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def vision_flan_fixture(folder: Path) -> dict:
    """The two upstream files: the annotation (records ``id``, ``image``, ``conversations``,
    ``task_name``; ids repeat) and the zip (top folder ``images_191task_1k/``, a non-ASCII name
    stored as ``#Uxxxx``); 5 records per task. The last record of the last two tasks is the
    same question on the same picture bytes under two file names: one cross-task duplicate."""
    folder.mkdir(parents=True, exist_ok=True)
    records, pictures = [], {}
    for t, task in enumerate(TASKS):
        for i in range(5):
            name = f"{task}_{i}.png" if (t, i) != (1, 0) else f"{task}_café_ü_{i}.png"
            pictures[name] = _png(COLOURS[i], mark=t * 5 + i)
            colour = ("red", "green", "blue", "yellow", "cyan")[i]
            prompt, answer = f"<image>\nTask {t}: what colour is it?", colour
            if t >= 2 and i == 4:
                pictures[name] = _png(COLOURS[4], mark=99)
                prompt = "<image>\nWhat colour is the picture?"
            conv = [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
            records.append(
                {"id": f"{i % 2}", "image": name, "conversations": conv, "task_name": task}
            )
    (folder / ANNOTATION_FILE).write_text(json.dumps(records), encoding="utf-8")
    with zipfile.ZipFile(folder / IMAGES_FILE, "w") as zf:
        zf.writestr("images_191task_1k/", b"")
        for name, data in pictures.items():
            zf.writestr("images_191task_1k/" + escape_member(name), data)
    return pictures


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The fake hub serving the Vision-FLAN fixture; the cache in tmp_path."""
    up = tmp_path / "upstream"
    pictures = vision_flan_fixture(up)
    files = {VF + f: (up / f).read_bytes() for f in (ANNOTATION_FILE, IMAGES_FILE)}
    fake = FakeHub(files)
    monkeypatch.setattr(cache, "_open_url", fake)
    monkeypatch.setenv("MERIT_LAB_CACHE", str(tmp_path / "cache"))
    fake.pictures = pictures
    return fake


def test_member_names_escape_both_ways():
    """Info-ZIP's escapes, worked by hand: é = U+00E9, ü = U+00FC, 😀 = U+1F600."""
    assert escape_member("café_ü.png") == "caf#U00e9_#U00fc.png"
    assert escape_member("a😀.jpg") == "a#L01f600.jpg"
    assert unescape_member("caf#U00e9_#U00FC.png") == "café_ü.png"
    assert unescape_member("a#L01f600.jpg") == "a😀.jpg"
    assert unescape_member(escape_member("Ωmega/ß.png")) == "Ωmega/ß.png"


def test_the_paper_selection_is_136_benchmark_free_tasks_by_name_hash():
    names = [f"task{i:03d}+x" for i in range(185)] + [
        "AI2D+diagram_qa",
        "textcaps+caption_generation",
        "TextVQA+ocr",
        "MMMU+x",
        "seedbench+y",
        "LLaVA+chat",
    ]
    got = paper_tasks(reversed(names))
    assert len(got) == 136 and len(set(got)) == 136
    assert not any(BENCHMARK_TASKS.search(t) for t in got)
    by_hash = sorted(names[:185], key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    assert got == by_hash[:136]
    assert paper_tasks(names) == got  # the order given does not matter


def test_fetch_vision_flan_from_the_hub_layout(hub, tmp_path, capsys):
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(f"# two tasks\n{TASKS[1]}\n{TASKS[0]}\n")
    out = tmp_path / "vf"
    argv = ["fetch-data", "vision-flan", "--out", str(out), "--tasks", str(tasks)]
    assert main([*argv, "--per-task", "3"]) == 0
    assert "wrote 2 tasks" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        f"{t}.jsonl" for t in TASKS[:2]
    )
    assert (out / "tasks.txt").read_text() == f"{TASKS[1]}\n{TASKS[0]}\n"
    meta = json.loads((out / "sources.json").read_text())
    assert "no licence field" in meta["licence"] and meta["n_tasks_upstream"] == 4
    assert {m["examples"] for m in meta["sources"].values()} == {3}
    assert not list(out.rglob("*.png"))  # nothing extracted
    rows = [json.loads(x) for x in (out / "train" / f"{TASKS[1]}.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in rows}) == 3  # unique, though upstream ids repeat ("0", "1")
    assert all(r["id"].startswith(f"{TASKS[1]}:{TASKS[1]}_") for r in rows)
    # the same seed draws the same 3 of 5; the draw is in file order
    assert main([*argv, "--per-task", "3", "--out", str(tmp_path / "again")]) == 0
    again = (tmp_path / "again" / "train" / f"{TASKS[1]}.jsonl").read_text()
    assert again == (out / "train" / f"{TASKS[1]}.jsonl").read_text()
    # every record of a task: the #U-escaped member is found under its real name and read lazily
    assert main([*argv, "--out", str(out)]) == 0
    mix = load_mixture(out, calibration_n=2, eval_fraction=0.2)
    ex = next(e for s in mix for sp in ("train", "eval") for e in s.split(sp) if "café" in e["id"])
    user = ex["messages"][0]["content"]
    assert [p["type"] for p in user] == ["image", "text"]
    assert user[1]["text"] == "Task 1: what colour is it?"
    assert ex["messages"][1] == {"role": "assistant", "content": "red"}
    ref = user[0]["image"]
    assert ref.endswith("::images_191task_1k/" + escape_member(f"{TASKS[1]}_café_ü_0.png"))
    name = f"{TASKS[1]}_café_ü_0.png"
    assert image_bytes(ref) == hub.pictures[name]
    assert np.array_equal(
        np.asarray(load_image(ref)), np.asarray(Image.open(io.BytesIO(hub.pictures[name])))
    )
    assert sum(len(s.train) + len(s.eval) for s in mix) == 10
    # the zip was downloaded once for the three fetches
    assert sum(url.endswith(IMAGES_FILE) for url, _ in hub.requests) == 1


def test_bad_vision_flan_input_fails_before_any_work(hub, tmp_path):
    out = tmp_path / "vf"
    unknown = tmp_path / "tasks.txt"
    unknown.write_text(f"{TASKS[0]}\nVQA-E+visual_question_answerin\n")
    argv = ["fetch-data", "vision-flan", "--out", str(out)]
    with pytest.raises(ValueError, match=r"1 task\(s\) not in the data.*did you mean"):
        from merit_lab.data.vision_flan import read_task_file, write_vision_flan_mixture

        write_vision_flan_mixture(out, read_task_file(unknown))
    assert not any(url.endswith(IMAGES_FILE) for url, _ in hub.requests)  # no 36 GB for a typo
    assert main([*argv, "--tasks", str(unknown)]) == 2
    assert main([*argv, "--tasks", str(tmp_path / "nope.txt")]) == 2
    assert main([*argv, "--sources", "english"]) == 2  # chatterbot's option
    assert main([*argv, "--tasks", "all", "--per-task", "-1"]) == 2
    # a corrupt zip and a missing annotation in a local copy: one error, nothing written
    local = tmp_path / "local"
    vision_flan_fixture(local)
    (local / IMAGES_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="not a readable zip"):
        write_vision_flan_mixture(out, "all", source_dir=local)
    (local / ANNOTATION_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{ANNOTATION_FILE}: missing"):
        write_vision_flan_mixture(out, "all", source_dir=local)
    assert not out.exists()


def test_a_download_cut_mid_stream_resumes_with_a_range_request(hub, tmp_path):
    url = VF + IMAGES_FILE
    size = len(hub.files[url])
    hub.cut_once[url] = size // 3
    dest = tmp_path / "z.zip"
    assert cache.download_file(url, dest) == dest
    assert dest.read_bytes() == hub.files[url]
    assert hub.requests[-2:] == [(url, None), (url, f"bytes={size // 3}-")]
    # a process that gave up leaves the part; the next call continues from its size
    hub.cut_once[url] = size // 2
    with pytest.raises(RuntimeError, match=r"resumes from .*z2\.zip\.part"):
        cache.download_file(url, tmp_path / "z2.zip", tries=1)
    assert (tmp_path / "z2.zip.part").stat().st_size == size // 2
    cache.download_file(url, tmp_path / "z2.zip")
    assert hub.requests[-1] == (url, f"bytes={size // 2}-")
    assert (tmp_path / "z2.zip").read_bytes() == hub.files[url]
    with pytest.raises(RuntimeError, match="HTTP 404"):
        cache.download_file(VF + "missing.json", tmp_path / "m.json")


def flan_fixture(folder: Path) -> dict[str, list[dict]]:
    """Muennighoff/flan's layout: ``train/<task>_10templates.jsonl`` of ``inputs``/``targets``
    records (and a validation file that is not read)."""
    tasks = {
        "anli_r1": [{"inputs": f"Premise {i}. Hypothesis?", "targets": "yes"} for i in range(6)],
        "ag_news_subset": [{"inputs": f"News {i}: topic?", "targets": "World"} for i in range(4)],
        "wmt16_translate_de-en": [{"inputs": "Hallo Welt", "targets": "Hello world"}] * 2
        + [{"inputs": "Leer", "targets": " "}],
    }
    for split in ("train", "validation"):
        (folder / split).mkdir(parents=True, exist_ok=True)
    for task, rows in tasks.items():
        lines = "".join(json.dumps({**r, "task": task}) + "\n" for r in rows)
        (folder / "train" / f"{task}_10templates.jsonl").write_text(lines)
        (folder / "validation" / f"{task}_10templates_validation.jsonl").write_text(lines)
    return tasks


def test_fetch_flan_from_the_hub_layout(tmp_path, monkeypatch):
    up = tmp_path / "flan-upstream"
    tasks = flan_fixture(up)
    files = {FLAN + f"train/{p.name}": p.read_bytes() for p in (up / "train").iterdir()}
    listing = [
        {"type": "file", "path": f"train/{p.name}", "size": 1} for p in (up / "train").iterdir()
    ]
    files[FLAN_TREE] = json.dumps([{"type": "directory", "path": "train/x"}, *listing]).encode()
    fake = FakeHub(files)
    monkeypatch.setattr(cache, "_open_url", fake)
    monkeypatch.setenv("MERIT_LAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "flan"
    assert main(["fetch-data", "flan", "--out", str(out), "--per-task", "5"]) == 0
    assert (out / "tasks.txt").read_text().split() == sorted(tasks)
    mix = load_mixture(out, calibration_n=1, eval_fraction=0.2)
    anli = [json.loads(x) for x in (out / "train" / "anli_r1.jsonl").read_text().splitlines()]
    assert len(anli) == 5 and [r["id"] for r in anli] == [f"anli_r1-{i}" for i in range(5)]
    assert {r["prompt"] for r in anli} < {r["inputs"] for r in tasks["anli_r1"]}
    wmt = mix["wmt16_translate_de-en"]
    assert len(wmt.train) + len(wmt.eval) == 2  # the empty target is left out
    meta = json.loads((out / "sources.json").read_text())["sources"]
    assert meta["wmt16_translate_de-en"]["skipped"] == {"empty inputs or targets": 1}
    assert meta["anli_r1"]["files"] == ["anli_r1_10templates.jsonl"]
    # an unknown task is refused before any task file is downloaded
    before = len(fake.requests)
    (tmp_path / "t.txt").write_text("anli_r2\n")
    assert main(["fetch-data", "flan", "--out", str(out), "--tasks", str(tmp_path / "t.txt")]) == 2
    assert [u for u, _ in fake.requests[before:]] == [FLAN_TREE]
    # a local copy (--from) gives the same folder
    local = tmp_path / "flan-local"
    assert (
        main(["fetch-data", "flan", "--out", str(local), "--from", str(up), "--per-task", "5"]) == 0
    )
    for p in (out / "train").iterdir():
        assert p.read_bytes() == (local / "train" / p.name).read_bytes()
    (up / "train" / "anli_r1_10templates.jsonl").write_text("{not json\n")
    assert main(["fetch-data", "flan", "--out", str(local), "--from", str(up)]) == 2


def _ex(i: str, prompt: str, answer: str, image: str | None = None) -> dict:
    content = (
        prompt
        if image is None
        else [{"type": "image", "image": image}, {"type": "text", "text": prompt}]
    )
    return {
        "id": i,
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": answer},
        ],
    }


def test_overlaps_counted_by_hand(tmp_path):
    """Four sources, every overlap placed by hand: a whitespace-only difference across two
    sources, one picture under two file names, an eval example trained elsewhere, and a hash
    list matching one training prompt and one training picture."""
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    red.write_bytes(_png(COLOURS[0]))
    blue.write_bytes(_png(COLOURS[2]))
    (tmp_path / "red-copy.png").write_bytes(red.read_bytes())
    a = Source(
        "a",
        (_ex("a0", "What is  2+2?", "4"), _ex("a1", "Colour?", "red", str(red))),
        (),
        (_ex("a2", "Name?", "x"),),
    )
    b = Source(
        "b",
        (_ex("b0", "What is 2+2?\n", "4"), _ex("b1", "Other", "y")),
        (),
        (_ex("b2", "Unseen", "z"),),
    )
    c = Source(
        "c",
        (_ex("c0", "Colour?", "red", str(tmp_path / "red-copy.png")),),
        (),
        (_ex("c1", "Other", "y"),),
    )
    d = Source(
        "d", (_ex("d0", "Colour?", "red", str(blue)), _ex("d1", "What is 2+2?", "5")), (), ()
    )
    bench = tmp_path / "bench.txt"
    write_hash_list(
        [
            _ex("q", "What  is 2+2?", "?"),
            _ex("q2", "Describe", "?", str(blue)),
            _ex("q3", "New", "?"),
        ],
        bench,
    )
    listed = read_hash_list(bench)
    assert (len(listed["text"]), len(listed["image"])) == (3, 1)
    got = mixture_overlaps([a, b, c, d], listed)
    dup = got["duplicates"]
    # groups: {a0, b0} (whitespace), {a1, c0} (same bytes); {b1, c1} spans b and c too
    assert dup["groups"] == 3 and dup["examples"] == 6
    assert sorted(tuple(p) for p in dup["by_pair"]) == [("a", "b", 1), ("a", "c", 1), ("b", "c", 1)]
    assert got["eval_in_train"] == {"n": 1, "by_source": {"c": 1}, "sample": ["c/c1"]}
    assert got["hash_list"] == {"text": 3, "image": 1, "text_in_train": 1, "image_in_train": 1}
    bad = tmp_path / "bad.txt"
    bad.write_text("text 1234\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1: expected"):
        read_hash_list(bad)


@pytest.mark.slow  # 92-170 s on 2 busy cores (diagnose: ~35 s at the fastest)
def test_the_fixture_mixture_runs_every_stage_with_the_image_text_demo_model(hub, tmp_path):
    """Vision-FLAN fixture (4 tasks, 5 records each, images read from the zip) through every
    stage with the image-text demo model; the report names the cross-task duplicate."""
    import yaml

    from merit_lab.pipeline import run_pipeline

    out = tmp_path / "vf"
    assert main(["fetch-data", "vision-flan", "--out", str(out), "--tasks", "all"]) == 0
    cfg = {
        "name": "vf-tiny",
        "model": str(DEMO_VL_BASE),
        "mixture": {"path": str(out), "eval_fraction": 0.2},
        "output_dir": str(tmp_path / "runs"),
        "calibration": {"n": 4, "micro_batch_size": 4, "max_length": 128},
        "partition": {"method": "balanced", "r": 1},
        "train": {"batch_size": 4, "lr": 1e-3, "save_steps": 50, "max_length": 128},
        "experiments": [
            {"name": "joint-1ep", "kind": "joint", "epochs": 1},
            {"name": "merit-1d", "merges": ["linear"]},
        ],
        "eval": {"max_examples": 1, "max_new_tokens": 2},
        "diagnostics": {
            "experiments": ["merit-1d"],
            "max_examples": 1,
            "alphas": 2,
            "sigmas": [0.0],
            "seeds": [0],
            "hessian_k": 1,
            "hessian_iter": 2,
            "curvature_examples": 1,
        },
    }
    path = tmp_path / "vf.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    run = run_pipeline(path)
    print(f"every stage on the fixture: {time.perf_counter() - start:.1f} s")
    mixture = json.loads(run.mixture.read_text())
    assert mixture["overlaps"]["duplicates"]["groups"] == 1
    assert mixture["overlaps"]["duplicates"]["by_pair"] == [[TASKS[2], TASKS[3], 1]]
    report = (run.root / "report.md").read_text()
    assert "duplicated across sources: 1 group(s)" in report


PAPER_BENCHMARKS = [
    "seedbench",
    "mmbench_en_dev",
    "llava_in_the_wild",
    "mmvet",
    "textvqa_val",
    "ai2d",
    "mathvista_testmini_format",
    "mmmu_val",
]


@pytest.mark.parametrize("name", ["paper-vl-3b", "paper-text-3b"])
def test_the_paper_configs_load_and_validate_offline(name, tmp_path, monkeypatch):
    """The paper's rows under 5 seeds; validation names the missing mixture with the command
    that fetches it, and passes on a fetched one, without touching the hub (a hub id is not
    resolved at validation)."""
    import huggingface_hub

    from merit_lab.config.schema import load_config
    from merit_lab.validate import config_problems

    def offline(*args, **kwargs):
        raise AssertionError("validation tried the network")

    monkeypatch.setattr(cache, "_open_url", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)  # data/vision-flan, data/flan: not fetched here
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    rows = {e.name: e for e in cfg.experiments}
    assert list(rows) == ["joint-1ep", "joint-2ep", "random-k4", "soup"] + [
        f"merit-{r}d" for r in (1, 2, 3)
    ]
    assert (rows["joint-2ep"].epochs, rows["random-k4"].k, rows["soup"].seeds) == (
        2,
        4,
        (0, 1, 2, 3),
    )
    assert [rows[f"merit-{r}d"].r for r in (1, 2, 3)] == [1, 2, 3]
    assert (cfg.train.seed, cfg.train.seeds, cfg.calibration.n) == (0, (1, 2, 3, 4), 200)
    corpus = "vision-flan" if name == "paper-vl-3b" else "flan"
    problems = config_problems(cfg, evaluate=False)
    assert problems == [
        f"mixture.path: 'data/{corpus}' does not exist yet: run `merit-lab fetch-data {corpus} "
        f"--out data/{corpus}` (from the hub)"
    ]
    fetched = tmp_path / "data" / corpus / "train"
    fetched.mkdir(parents=True)
    for t in range(8):  # K = 8 needs 8 sources (counted from the file names)
        (fetched / f"task{t}.jsonl").write_text("")
    assert config_problems(cfg, evaluate=False) == []
    if name == "paper-vl-3b":
        assert cfg.model == "Qwen/Qwen2.5-VL-3B-Instruct"
        assert list(cfg.eval.lmms_eval["tasks"]) == PAPER_BENCHMARKS
    else:
        assert cfg.model == "Qwen/Qwen2.5-3B" and len(cfg.eval.lm_eval["tasks"]) == 8
