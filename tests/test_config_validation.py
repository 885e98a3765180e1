"""A config is checked when it is loaded and before any work: types (``1e-3`` is a number),
ranges, every choice against its registry (with the valid choices), the model folder and the
device; one message names each problem by its key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from merit_lab.cli import main
from merit_lab.config.schema import RunConfig, TrainConfig, load_config
from merit_lab.data.mixture import SPLITS
from merit_lab.merging.methods import MERGE_METHODS
from merit_lab.partition.methods import PARTITION_METHODS
from merit_lab.pipeline import run_pipeline
from merit_lab.validate import validate_config

ROOT = Path(__file__).resolve().parents[1]
SPLIT = "experiments: [{name: m, method: balanced, r: 1}]\n"


def _error(tmp_path: Path, text: str) -> str:
    """The message a config's YAML text fails with, at load or at validation."""
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        validate_config(load_config(path))
    return str(info.value)


# (YAML, the key path the message names, the choices it lists)
MISTAKES = [
    ("train: {lr: fast}\n", "train.lr: expected a number, got 'fast'", []),
    ("train: {lr: -1e-3}\n", "train.lr: must be > 0", []),
    ("train: {batch_size: 0}\n", "train.batch_size: must be >= 1", []),
    ("train: {batch_size: 2.5}\n", "train.batch_size: expected an integer", []),
    ("train: {grad_accum: -1}\n", "train.grad_accum: must be >= 1", []),
    ("train: {warmup_ratio: 1.0}\n", "train.warmup_ratio: must be in [0, 1)", []),
    ("train: {weight_decay: -0.1}\n", "train.weight_decay: must be >= 0", []),
    ("train: {save_steps: 0}\n", "train.save_steps: must be >= 1", []),
    ("train: {n_procs: 0}\n", "train.n_procs: must be >= 1", []),
    ("train: {gpus: '0,1'}\n", "train.gpus: expected a list", []),
    ("train: {lr_scheduler: cosin}\n", "train.lr_scheduler", ["cosine", "linear", "constant"]),
    ("train: {launcher: slurmm}\n", "train.launcher", ["sequential", "local", "slurm"]),
    ("device: gpu\n", "device: unknown device 'gpu'", ["auto", "cpu", "cuda", "cuda:N"]),
    ("dtype: fp16\n", "dtype: unknown dtype 'fp16'", ["auto", "float32", "bfloat16", "float16"]),
    ("sketch: {kind: fft}\n", "sketch.kind", ["countsketch", "gaussian", "subsample", "exact"]),
    ("sketch: {dim: 0}\n", "sketch.dim", []),
    ("partition: {method: spectral}\n", "partition.method", list(PARTITION_METHODS)),
    ("partition: {r: -1}\n", "partition.r: must be >= 0", []),
    ("partition: {r: null, k: 0}\n", "partition.k: must be >= 1", []),
    ("calibration: {n: 0}\n", "calibration.n: must be >= 1", []),
    ("calibration: {micro_batch_size: -4}\n", "calibration.micro_batch_size: must be >= 1", []),
    ("calibration: {max_length: 4}\n", "calibration.max_length: must be >= 8", []),
    ("calibration: 200\n", "calibration: expected a mapping", []),
    ("mixture: {eval_fraction: 1}\n", "mixture.eval_fraction: must be in [0, 1)", []),
    ("seed: -1\n", "seed: must be >= 0", []),
    ("experiments: joint-1ep\n", "experiments: expected a list of experiments", []),
    (
        "experiments: [{name: a, kind: ensemble}]\n",
        "experiments[0].kind",
        ["joint", "split", "soup"],
    ),
    ("experiments: [{kind: joint}]\n", "experiments[0].name: required", []),
    (
        "experiments: [{name: a, kind: joint, epochs: 0}]\n",
        "experiments[0].epochs: must be > 0",
        [],
    ),
    ("experiments: [{name: s, kind: soup, seeds: [1, 1]}]\n", "experiments[0].seeds", []),
    (
        "experiments: [{name: a, method: kmean, k: 2}]\n",
        "experiments[0].method",
        list(PARTITION_METHODS),
    ),
    (
        "experiments: [{name: a, merges: [linear, tie]}]\n",
        "experiments[0].merges[1]",
        list(MERGE_METHODS),
    ),
    ("experiments: [{name: a, merges: linear}]\n", "experiments[0].merges: expected a list", []),
    ("merge: {params: {tie: {density: 0.5}}}\n", "merge.params.tie", list(MERGE_METHODS)),
    ("merge: {params: {ties: {densty: 0.5}}}\n", "merge.params.ties.densty", ["density", "lambda"]),
    ("merge: {params: {ties: {density: 2}}}\n", "merge.params.ties.density: must be in (0, 1]", []),
    ("eval: {splits: [test]}\n", "eval.splits[0]", list(SPLITS)),
    ("eval: {splits: []}\n", "eval.splits: give at least one split", []),
    ("eval: {max_new_tokens: 0}\n", "eval.max_new_tokens: must be >= 1", []),
    ("eval: {max_examples: 0}\n", "eval.max_examples: must be >= 1", []),
    ("eval: {exact_match: sure}\n", "eval.exact_match: expected true or false", []),
    ("diagnostics: {alphas: 1}\n", "diagnostics.alphas: must be >= 2", []),
    ("diagnostics: {sigmas: [0, -1e-3]}\n", "diagnostics.sigmas: must be >= 0", []),
    ("diagnostics: {hessian_k: 0}\n", "diagnostics.hessian_k: must be >= 1", []),
    (
        "diagnostics: {experiments: [joint-1ep]}\n",
        "diagnostics.experiments[0]",
        ["merit-1d", "merit-2d", "random-k4"],
    ),
    (SPLIT + "diagnostics: {experiments: [m2]}\n", "diagnostics.experiments[0]", ["m"]),
    ("model: ./no/such/model\n", "model: './no/such/model': no such folder, and not a hub id", []),
    ("name: a/b\n", "name: must be a folder name", []),
    ("trian: {lr: 1.0e-4}\n", "unknown keys ['trian']", ["train"]),
]


@pytest.mark.parametrize(("text", "names", "choices"), MISTAKES, ids=[m[1] for m in MISTAKES])
def test_a_newcomer_mistake_names_its_key_and_the_choices(tmp_path, text, names, choices):
    message = _error(tmp_path, text)
    assert names in message
    for choice in choices:
        assert choice in message, (choice, message)
    assert str(tmp_path / "x.yaml") in message or message.startswith("config ")


def test_every_problem_is_listed_in_one_message(tmp_path):
    message = _error(
        tmp_path, "train: {lr: fast, batch_size: 0}\ncalibration: {n: 0}\ndevice: gpu\n"
    )
    lines = message.splitlines()
    assert len(lines) == 4
    assert all(line.startswith(f"{tmp_path / 'x.yaml'}: ") for line in lines)
    for key in ["train.lr", "train.batch_size", "calibration.n", "device"]:
        assert any(f": {key}: " in line for line in lines), key


def test_registry_problems_are_listed_together(tmp_path):
    message = _error(tmp_path, "dtype: half\ntrain: {launcher: mpi}\neval: {splits: [test]}\n")
    assert len(message.splitlines()) == 3
    assert all(line.startswith("config 'demo': ") for line in message.splitlines())


def test_yaml_1e_minus_3_is_a_number(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train: {lr: 1e-3}\ndiagnostics: {sigmas: [0, 1e-3]}\n")
    assert yaml.safe_load(path.read_text())["train"]["lr"] == "1e-3"  # YAML 1.1: a string
    cfg = load_config(path)
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.diagnostics.sigmas == (0, 0.001)


def test_numbers_keep_their_yaml_form_where_they_are_right(tmp_path):
    # an int in a float field stays an int: the stored keys of existing runs do not move
    path = tmp_path / "x.yaml"
    path.write_text("experiments: [{name: j, kind: joint, epochs: 1}]\ncalibration: {n: 8.0}\n")
    cfg = load_config(path)
    assert cfg.experiments[0].epochs == 1 and isinstance(cfg.experiments[0].epochs, int)
    assert cfg.calibration.n == 8 and isinstance(cfg.calibration.n, int)


def test_the_demo_configs_load_validate_and_round_trip():
    for name in ["demo.yaml", "demo-full.yaml"]:
        cfg = load_config(ROOT / "configs" / name)
        validate_config(cfg)
        assert RunConfig.from_dict(cfg.to_dict()) == cfg
    validate_config(RunConfig())


def test_direct_construction_checks_ranges_too():
    with pytest.raises(ValueError, match="lr: must be > 0"):
        TrainConfig(lr=0.0)


def test_a_hub_id_is_left_to_the_hub_and_a_bare_folder_is_refused(tmp_path):
    import shutil

    from merit_lab.demo import DEMO_DIR

    validate_config(RunConfig(model="org/name"))
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        validate_config(RunConfig(model=str(folder)))
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no .safetensors weights"):
        validate_config(RunConfig(model=str(folder)))
    shutil.copy(DEMO_DIR / "base" / "model.safetensors", folder)
    with pytest.raises(ValueError, match="no tokenizer files"):
        validate_config(RunConfig(model=str(folder)))
    (folder / "tokenizer.json").write_text("{}")  # the header of each weight file is read too
    validate_config(RunConfig(model=str(folder)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_fails_before_any_work(tmp_path):
    message = _error(tmp_path, "device: cuda\n")
    assert "device: 'cuda' but torch.cuda.is_available() is False; use auto or cpu" in message


def test_a_bad_config_fails_before_any_work(tmp_path):
    path = tmp_path / "x.yaml"
    out = tmp_path / "runs"
    path.write_text(
        yaml.safe_dump({"name": "bad", "output_dir": str(out), "train": {"launcher": "mpi"}})
    )
    with pytest.raises(ValueError, match="train.launcher"):
        run_pipeline(path)
    cfg = load_config(path)
    with pytest.raises(ValueError, match="train.launcher"):
        run_pipeline(cfg, until="mixture")
    assert not (out / "bad").exists() or not any((out / "bad").iterdir())


def test_cli_prints_the_problems_and_exits_2(tmp_path, capsys):
    path = tmp_path / "x.yaml"
    path.write_text("train: {lr: fast}\ndtype: half\n")
    assert main(["run", str(path), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"merit-lab: error: {path}: train.lr: expected a number, got 'fast'" in err
    path.write_text("dtype: half\n")
    assert main(["run", str(path), "--output-dir", str(tmp_path / "runs")]) == 2
    assert "merit-lab: error: config 'demo': dtype: unknown dtype 'half'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_cli_command_shows_no_traceback(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("eval: {splits: [test]}\n")
    exe = Path(sys.executable).parent / "merit-lab"
    proc = subprocess.run(
        [str(exe), "run", str(path), "--output-dir", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "eval.splits[0]: unknown split 'test'" in proc.stderr
    missing = subprocess.run(
        [str(exe), "run", str(tmp_path / "nope.yaml")], capture_output=True, text=True, timeout=1800
    )
    assert missing.returncode == 2 and "no such config file" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_config_still_imports_without_torch():
    code = "import sys, merit_lab.config.schema; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_diagnostics_experiments_are_checked_when_the_diagnose_stage_runs(tmp_path):
    # a notebook that trains a smaller table than its config need not restate the diagnostics
    path = tmp_path / "x.yaml"
    out = tmp_path / "runs"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "small",
                "output_dir": str(out),
                "experiments": [{"name": "merit-1d", "r": 1, "method": "balanced"}],
                "diagnostics": {"experiments": ["merit-2d"]},
            }
        )
    )
    cfg = load_config(path)
    validate_config(cfg, diagnose=False)
    with pytest.raises(ValueError, match=r"diagnostics.experiments\[0\]: 'merit-2d'.*merit-1d"):
        run_pipeline(cfg, ["diagnose", "report"])
    assert not (out / "small").exists()


def test_a_hessian_that_cannot_fit_in_memory_is_refused_before_any_work(
    tmp_path, monkeypatch, capsys
):
    import merit_lab.validate as validate

    monkeypatch.setattr(validate, "_available_memory", lambda: 64 * 2**20)  # 64 MiB free
    path = tmp_path / "c.yaml"
    path.write_text(f"output_dir: {tmp_path}\nexperiments: [{{name: m, method: balanced, r: 1}}]\n")
    cfg = load_config(path)
    problem = validate.curvature_memory_problem(cfg, ROOT / "data" / "demo" / "base")
    # the demo base has 653,056 parameters; 20 Lanczos vectors + 4 in float64
    assert problem is not None and f"{8 * 24 * 653_056 / 2**30:.1f} GiB" in problem
    assert "20 Lanczos vectors of 653,056 parameters" in problem
    assert "diagnostics.curvature_params" in problem
    assert main(["run", str(path)]) == 2  # the whole pipeline, diagnose included: no work
    assert "the Hessian needs about" in capsys.readouterr().err
    assert not (tmp_path / "demo" / "mixture.json").exists()
    assert main(["run", str(path), "--stages", "mixture"]) == 0  # no diagnose stage: no check
    small = load_config(path, diagnostics={"curvature_params": ["*.norm.weight"]})
    assert validate.curvature_memory_problem(small, ROOT / "data" / "demo" / "base") is None


# The two mistakes that used to pass `--until partition` and fail hours later (issue 27): a
# global batch that the branch's processes cannot share, and an lm-eval task lm-eval lacks.
def _local_lm_eval_tasks(folder: Path) -> str:
    """A folder with one lm-eval task YAML (``local_gen``), as `write_local_tasks` writes them."""
    from merit_lab.evaluation.lm_eval import write_local_tasks

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
        for i in range(4)
    ]
    write_local_tasks({"s": rows}, folder)
    return str(folder)


def _refused_by_until_partition(tmp_path: Path, capsys, extra: dict) -> str:
    """`merit-lab run --until partition` on a demo config with ``extra``: exit 2, no run
    folder (no stage ran); returns the error text."""
    path = tmp_path / "late.yaml"
    out = tmp_path / "runs"
    path.write_text(yaml.safe_dump({"name": "late", "output_dir": str(out), **extra}))
    assert main(["run", str(path), "--until", "partition"]) == 2
    assert not (out / "late").exists()
    return capsys.readouterr().err


def test_procs_per_branch_that_cannot_share_the_batch_is_refused_at_load(tmp_path, capsys):
    err = _refused_by_until_partition(
        tmp_path, capsys, {"train": {"procs_per_branch": 3, "batch_size": 32}}
    )
    assert (
        "train.procs_per_branch: 3 divides neither grad_accum=1 nor batch_size=32: the global "
        "batch of 32 examples per optimizer step cannot be split evenly" in err
    )
    # the rule the branches apply (training.distributed.split_global_batch): either divides
    assert TrainConfig(procs_per_branch=3, batch_size=32, grad_accum=3).procs_per_branch == 3
    assert TrainConfig(procs_per_branch=4, batch_size=32).procs_per_branch == 4


def test_an_unknown_lm_eval_task_is_refused_at_load(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    tasks = _local_lm_eval_tasks(tmp_path / "tasks")
    lm = {"tasks": ["local_gen", "local_gne"], "include_path": tasks}
    err = _refused_by_until_partition(tmp_path, capsys, {"eval": {"lm_eval": lm}})
    assert (
        f"eval.lm_eval.tasks[1]: lm-eval has no task 'local_gne' in {tasks}; did you mean: "
        "local_gen" in err
    )
    assert "tasks[0]" not in err  # the task the folder defines resolves
    gone = {"tasks": ["local_gen"], "include_path": str(tmp_path / "none")}
    err = _refused_by_until_partition(tmp_path, capsys, {"eval": {"lm_eval": gone}})
    assert "eval.lm_eval.include_path: " in err and "is not a folder" in err


def test_lm_eval_names_resolve_against_its_built_in_registry(tmp_path):
    pytest.importorskip("lm_eval")
    cfg = RunConfig.from_dict({"eval": {"lm_eval": {"tasks": ["arc_easy", "hellaswagg"]}}})
    with pytest.raises(ValueError) as info:
        validate_config(cfg)
    (line,) = str(info.value).splitlines()
    assert line.startswith(
        "config 'demo': eval.lm_eval.tasks[1]: lm-eval has no task 'hellaswagg' among its "
        "built-in tasks; did you mean: hellaswag"
    )


def test_without_lm_eval_the_evaluate_stage_is_refused_and_analysis_warned(
    tmp_path, monkeypatch, caplog
):
    # lm-eval is optional: without it the task names cannot be resolved. The evaluate stage
    # would fail after training, so a run that includes it is refused; `--until partition`
    # runs, with a warning naming what was not checked.
    import importlib.util

    import merit_lab.validate as validate

    real = importlib.util.find_spec
    monkeypatch.setattr(
        validate.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "lm_eval" else real(name, *a),
    )
    cfg = RunConfig.from_dict({"eval": {"lm_eval": {"tasks": ["no_such_task"]}}})
    with pytest.raises(ValueError) as info:
        validate_config(cfg)
    assert str(info.value) == (
        "config 'demo': eval.lm_eval: lm-eval is not installed, and the evaluate stage runs its "
        "tasks after training; pip install 'lm-eval>=0.4' (or remove eval.lm_eval)"
    )
    with caplog.at_level("WARNING", logger="merit_lab.validate"):
        validate_config(cfg, evaluate=False)
    assert "its task names ['no_such_task'] are not checked" in caplog.text


def test_fsdp_on_cpu_branches_is_refused_at_load(tmp_path, capsys):
    train = {"procs_per_branch": 2, "distributed": "fsdp"}
    err = _refused_by_until_partition(tmp_path, capsys, {"device": "cpu", "train": train})
    assert "train.distributed: fsdp needs GPUs" in err
    validate_config(
        RunConfig.from_dict({"device": "cpu", "train": {**train, "distributed": "ddp"}})
    )


def test_force_train_is_refused_before_the_earlier_stages_run(tmp_path):
    path = tmp_path / "f.yaml"
    out = tmp_path / "runs"
    path.write_text(yaml.safe_dump({"name": "f", "output_dir": str(out)}))
    with pytest.raises(ValueError, match="--force train would retrain"):
        run_pipeline(path, force=True)
    assert not (out / "f").exists()


def test_a_density_that_keeps_no_entry_is_refused_at_load(tmp_path):
    # the demo base's smallest tensors are its 128-entry norms: int(0.005 x 128) = 0
    text = (
        "experiments: [{name: m, method: balanced, r: 1, merges: [linear, ties]}]\n"
        "merge: {params: {ties: {density: 0.005}}}\n"
    )
    assert _error(tmp_path, text) == (
        "config 'demo': merge.params.ties.density: 0.005 keeps no entry of θ0's smallest tensor "
        "'model.layers.0.input_layernorm.weight' (128 entries: int(density x 128) = 0); use "
        "density >= 0.00781"
    )
    validate_config(load_config(tmp_path / "x.yaml", merge={"params": {"ties": {"density": 0.01}}}))
    # a method no split experiment merges with is not checked against the model
    validate_config(load_config(tmp_path / "x.yaml", experiments=[{"name": "j", "kind": "joint"}]))
