"""Recipe parsing and the CLI's answer to bad input.

The first half drives the typed parser directly (fast, no subprocess). The second half runs
``python -m effvision`` as a user does and checks the promise of effvision/cli.py: every bad
input (recipe, model, dataset, checkpoint, NaN loss, a clashing run dir or export folder)
exits with code 2 and one ``effvision: error:`` line on stderr, never a traceback.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from effvision.config import apply_overrides, load_yaml, parse
from effvision.errors import ConfigError, EffVisionError
from effvision.recipe import Recipe, load_recipe, parse_recipe, recipe_to_dict

# --------------------------------------------------------------------------------------
# helpers (kept in this file: tests/conftest.py belongs to other work)
# --------------------------------------------------------------------------------------

ERROR_PREFIX = "effvision: error:"
# tqdm's progress bar on stderr (the train stage draws one even without a TTY)
_PROGRESS = re.compile(r"^\s*\d+%\|")


def base_recipe(**train: object) -> dict:
    """A seconds-long CPU recipe on scikit-learn's digits."""
    return {
        "name": "cfgtest",
        "seed": 0,
        "device": "cpu",
        "model": {"name": "vit_micro_patch4_32", "kwargs": {}},
        "data": {"name": "digits", "batch_size": 32, "eval_batch_size": 64, "limit_train": 64,
                 "limit_eval": 32, "augment": {"crop_padding": 2, "hflip": False}},
        "stages": [{"type": "train", "epochs": 1, "eval_every": 0, "log_every": 1,
                    "optimizer": {"name": "adamw", "lr": 1.0e-3},
                    "scheduler": {"name": "cosine", "warmup_epochs": 0.0}, **train}],
    }


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "effvision", *args]


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*args), cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


def assert_one_error_line(rc: int, stderr: str, *needles: str, progress_allowed: bool = False) -> str:
    """Exit code 2, exactly one ``effvision: error:`` line, no traceback; returns that line.

    Without ``progress_allowed`` stderr must be that line and nothing else. With it, the only
    other lines allowed are tqdm redraws (str.splitlines splits on the bar's carriage returns).
    """
    assert rc == 2, f"exit code {rc}, stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, f"expected one '{ERROR_PREFIX}' line, got:\n{stderr}"
    others = [line for line in lines if not line.startswith(ERROR_PREFIX)]
    if progress_allowed:
        assert all(_PROGRESS.match(line) for line in others), f"unexpected stderr lines: {others}"
    else:
        assert not others, f"stderr holds more than the error line:\n{stderr}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


# --------------------------------------------------------------------------------------
# parsing: unknown keys, types, overrides, stage types, YAML syntax
# --------------------------------------------------------------------------------------


def test_base_recipe_parses_into_typed_config():
    recipe = parse_recipe(base_recipe())
    assert isinstance(recipe, Recipe)
    train = recipe.stages[0]
    assert train.type == "train" and train.epochs == 1 and train.optimizer.lr == pytest.approx(1e-3)
    assert recipe.data.limit_train == 64 and recipe.data.augment.hflip is False
    # unspecified values take the dataclass defaults
    assert recipe.deterministic is False and train.label_smoothing == pytest.approx(0.1)


def test_shipped_recipes_parse(tmp_path):
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    paths = sorted(recipes.glob("*.yaml"))
    assert paths, "no recipes shipped"
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.stages, path
        # the resolved dict round-trips through YAML to the same recipe
        again = parse_recipe(yaml.safe_load(yaml.safe_dump(recipe_to_dict(recipe))))
        assert recipe_to_dict(again) == recipe_to_dict(recipe), path


def test_misspelled_stage_key_names_key_and_suggestion():
    data = base_recipe()
    data["stages"][0]["epocs"] = data["stages"][0].pop("epochs")
    with pytest.raises(ConfigError) as e:
        parse_recipe(data)
    msg = str(e.value)
    assert "epocs" in msg and "did you mean 'epochs'" in msg


@pytest.mark.parametrize("path, bad, good", [
    ((), "modle", "model"),
    (("data",), "batchsize", "batch_size"),
    (("data", "augment"), "hflp", "hflip"),
    (("stages", 0, "optimizer"), "lrr", "lr"),
    (("stages", 0, "scheduler"), "warmup_epoch", "warmup_epochs"),
])
def test_unknown_key_anywhere_suggests_closest(path, bad, good):
    data = base_recipe()
    node = data
    for p in path:
        node = node[p]
    node[bad] = node.pop(good, 1)
    with pytest.raises(ConfigError) as e:
        parse_recipe(data)
    msg = str(e.value)
    assert f"'{bad}" in msg or f".{bad}'" in msg, msg
    assert f"did you mean '{good}'" in msg, msg


def test_unrelated_unknown_key_lists_valid_keys():
    data = base_recipe()
    data["data"]["zzzz"] = 1
    with pytest.raises(ConfigError, match=r"unknown key 'data\.zzzz'.*valid keys: .*batch_size"):
        parse_recipe(data)


@pytest.mark.parametrize("path, value, expect", [
    (("seed",), "zero", "expected an integer"),
    (("seed",), 1.5, "expected an integer"),
    (("deterministic",), 1, "expected true/false"),
    (("device",), "gpu", "not one of"),
    (("data", "batch_size"), "64", "expected an integer"),
    (("data", "batch_size"), True, "expected an integer"),
    (("data", "augment", "hflip"), "sometimes", "expected true/false"),
    (("data", "augment", "scale"), 0.5, "expected a list"),
    (("model", "kwargs"), [1, 2], "expected a mapping"),
    (("model", "name"), 3, "expected a string"),
    (("stages", 0, "epochs"), 2.5, "expected an integer"),
    (("stages", 0, "optimizer", "lr"), "fast", "expected a number"),
    (("stages", 0, "optimizer", "lr"), True, "expected a number"),
    (("stages", 0, "amp"), "fp8", "not one of"),
])
def test_wrong_types_fail_naming_the_position(path, value, expect):
    data = base_recipe()
    node = data
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as e:
        parse_recipe(data)
    msg = str(e.value)
    assert expect in msg, msg
    assert str(path[-1]) in msg, msg  # names the key at fault


def test_numbers_yaml_reads_as_strings_are_accepted_for_floats():
    data = base_recipe()
    data["stages"][0]["optimizer"]["lr"] = "2e-3"  # PyYAML reads 2e-3 as a string
    assert parse_recipe(data).stages[0].optimizer.lr == pytest.approx(2e-3)


def test_validation_rejects_bad_values():
    for mutate, expect in [
        (lambda d: d["stages"][0].update(epochs=0), "epochs must be positive"),
        (lambda d: d["stages"][0].update(label_smoothing=1.0), "label_smoothing"),
        (lambda d: d["stages"][0]["optimizer"].update(lr=-1.0), "lr must be a positive finite number"),
        (lambda d: d["stages"][0]["optimizer"].update(name="adamww"), "did you mean 'adamw'"),
        (lambda d: d["data"].update(batch_size=0), "batch sizes must be positive"),
        (lambda d: d["data"].update(name="cifar10"), "needs a root"),
    ]:
        data = base_recipe()
        mutate(data)
        with pytest.raises(ConfigError, match=re.escape(expect)):
            parse_recipe(data)


def test_nan_learning_rate_is_rejected_at_parse_time(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", base_recipe())
    with pytest.raises(ConfigError, match="lr"):
        load_recipe(path, ["stages.train.optimizer.lr=nan"])


def test_unknown_stage_type_suggests_closest():
    data = base_recipe()
    data["stages"].append({"type": "exprot"})
    with pytest.raises(ConfigError) as e:
        parse_recipe(data)
    msg = str(e.value)
    assert "stages[1].type" in msg and "'exprot'" in msg and "did you mean 'export'" in msg


def test_unknown_stage_type_without_close_match_lists_known_stages():
    data = base_recipe()
    data["stages"][0]["type"] = "zzzzzz"
    with pytest.raises(ConfigError, match=r"unknown stage 'zzzzzz'; known: .*train"):
        parse_recipe(data)


@pytest.mark.parametrize("stages", [None, [], "train", [{"epochs": 3}], [["train"]]])
def test_stages_must_be_a_nonempty_list_of_typed_mappings(stages):
    data = base_recipe()
    if stages is None:
        del data["stages"]
    else:
        data["stages"] = stages
    with pytest.raises(ConfigError, match="stage"):
        parse_recipe(data)


def test_set_override_by_stage_type_and_index(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", base_recipe())
    recipe = load_recipe(path, ["stages.train.epochs=5", "stages.0.optimizer.lr=3e-4",
                                "data.batch_size=16", "data.augment.hflip=true", "data.limit_eval=null",
                                "model.kwargs.drop_path_rate=0.1", "name=renamed"])
    train = recipe.stages[0]
    assert train.epochs == 5 and isinstance(train.epochs, int)
    assert train.optimizer.lr == pytest.approx(3e-4)
    assert recipe.data.batch_size == 16 and recipe.data.augment.hflip is True
    assert recipe.data.limit_eval is None
    assert recipe.model.kwargs == {"drop_path_rate": 0.1}
    assert recipe.name == "renamed"


def test_set_override_values_are_type_checked(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", base_recipe())
    with pytest.raises(ConfigError) as e:
        load_recipe(path, ["stages.0.epochs=x"])
    assert "stages[0].epochs" in str(e.value) and "expected an integer" in str(e.value)
    with pytest.raises(ConfigError, match="expected true/false"):
        load_recipe(path, ["data.augment.hflip=maybe"])
    with pytest.raises(ConfigError, match="expected a number"):
        load_recipe(path, ["stages.train.optimizer.lr=fast"])


def test_set_override_of_unknown_key_gets_a_suggestion(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", base_recipe())
    with pytest.raises(ConfigError, match=r"unknown key 'stages\[0\]\.epocs'; did you mean 'epochs'"):
        load_recipe(path, ["stages.train.epocs=5"])
    with pytest.raises(ConfigError, match=r"did you mean 'batch_size'"):
        load_recipe(path, ["data.batchsize=5"])


@pytest.mark.parametrize("override, expect", [
    ("stages.train.epochs", "not of the form key=value"),
    ("stages.eval.epochs=1", "no item of type 'eval'"),
    ("stages.3.epochs=1", "out of range"),
    ("seed.x=1", "not a mapping"),
])
def test_bad_set_overrides(tmp_path, override, expect):
    path = write_recipe(tmp_path / "r.yaml", base_recipe())
    with pytest.raises(ConfigError, match=re.escape(expect)):
        load_recipe(path, [override])


def test_override_by_type_is_ambiguous_with_two_stages_of_that_type(tmp_path):
    data = base_recipe()
    data["stages"].append(copy.deepcopy(data["stages"][0]))
    path = write_recipe(tmp_path / "r.yaml", data)
    with pytest.raises(ConfigError, match="more than one item of type 'train'"):
        load_recipe(path, ["stages.train.epochs=2"])
    assert load_recipe(path, ["stages.1.epochs=2"]).stages[1].epochs == 2


def test_overrides_do_not_touch_the_recipe_file(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", base_recipe())
    before = path.read_bytes()
    load_recipe(path, ["stages.train.epochs=7"])
    assert path.read_bytes() == before
    raw = load_yaml(path)
    assert apply_overrides(raw, ["seed=3"]) is raw and raw["seed"] == 3


MALFORMED = (
    "name: t\n"
    "seed: 0\n"
    "data:\n"
    "  name: digits\n"
    "  batch_size: 64: 32\n"      # line 5: a second ':' on one line
    "stages:\n"
    "  - type: train\n"
)


def test_malformed_yaml_reports_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(MALFORMED)
    with pytest.raises(ConfigError) as e:
        load_yaml(path)
    msg = str(e.value)
    assert "malformed YAML" in msg and str(path) in msg
    m = re.search(r"line (\d+), column (\d+)", msg)
    assert m, msg
    assert int(m.group(1)) == 5 and int(m.group(2)) == 17  # the second colon


def test_tab_indentation_reports_its_line(tmp_path):
    path = tmp_path / "tab.yaml"
    path.write_text("name: t\ndata:\n  name: digits\n\tbatch_size: 3\nstages: []\n")
    with pytest.raises(ConfigError, match=r"line 4, column 1"):
        load_yaml(path)


@pytest.mark.parametrize("text, expect", [
    ("", "a recipe is a YAML mapping"),
    ("- a\n- b\n", "a recipe is a YAML mapping"),
])
def test_recipe_must_be_a_mapping(tmp_path, text, expect):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expect):
        load_yaml(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_yaml(tmp_path / "nope.yaml")


def test_parse_rejects_non_mapping_section():
    with pytest.raises(ConfigError, match="data: expected a mapping"):
        parse(Recipe, {"data": "digits"})


# --------------------------------------------------------------------------------------
# the CLI: exit code 2, one line, no traceback
# --------------------------------------------------------------------------------------


def _save_untrained(name: str, directory: Path) -> Path:
    import timm

    from effvision.models.io import ModelSpec, save_model

    model = timm.create_model(name)
    return save_model(model, ModelSpec(name=name), directory)


def _nan_recipe() -> dict:
    # adamw at lr 1e6 without label smoothing: the first update blows the weights up and the
    # loss of step 1 is NaN (deterministic on the CPU with seed 0). checkpoint_every 1 makes a
    # checkpoint after every finite step, so one written after the NaN would show.
    data = base_recipe(epochs=2, log_every=1, checkpoint_every=1, label_smoothing=0.0,
                       optimizer={"name": "adamw", "lr": 1.0e6, "weight_decay": 0.0})
    data["data"].update(limit_train=256, limit_eval=64)
    return data


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Start the CLI calls side by side, collect their results lazily, per test.

    Each ``python -m effvision`` pays ~7 s of imports (timm, torchvision); running them side by
    side uses both cores. The two calls that need a finished run / export start once those are
    made in-process.
    """
    from effvision.export import OnnxExportConfig, export_model_dir
    from effvision.pipeline import run_recipe

    root = tmp_path_factory.mktemp("cli")
    recipe = write_recipe(root / "recipe.yaml", base_recipe())
    (root / "malformed.yaml").write_text(MALFORMED)
    (root / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    typo = base_recipe()
    typo["stages"][0]["epocs"] = typo["stages"][0].pop("epochs")
    write_recipe(root / "typo.yaml", typo)
    write_recipe(root / "nan.yaml", _nan_recipe())

    corrupt = _save_untrained("vit_micro_patch4_32", root / "corrupt_model")
    (corrupt / "model.safetensors").write_bytes(os.urandom(4096))
    mismatched = root / "mismatched_model"
    _save_untrained("vit_tiny_patch4_32", mismatched)
    micro = _save_untrained("vit_micro_patch4_32", root / "micro_model")
    (mismatched / "model.json").write_bytes((micro / "model.json").read_bytes())

    def start(args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(cli_cmd(*args), cwd=root, env=cli_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    procs: dict[str, subprocess.Popen] = {}
    try:
        procs.update({name: start(args) for name, args in {
            "nan_loss": ["run", str(root / "nan.yaml"), "--out", "r_nan"],  # the longest: start it first
            "malformed_yaml": ["run", str(root / "malformed.yaml"), "--out", "r_malformed"],
            "unknown_key": ["run", str(root / "typo.yaml"), "--out", "r_typo"],
            "binary_recipe": ["run", str(root / "binary.yaml"), "--out", "r_binary"],
            "model_typo": ["run", str(recipe), "--out", "r_typo_model", "--set", "model.name=vit_tiny_patch16_2244"],
            "unknown_model": ["run", str(recipe), "--out", "r_model", "--set", "model.name=not_a_model"],
            "missing_dataset": ["run", str(recipe), "--out", "r_data", "--set", "data.name=cifar10",
                                "--set", "data.root=/nonexistent"],
            "corrupt_checkpoint": ["export", str(corrupt), "--out", "x_corrupt"],
            "mismatched_checkpoint": ["export", str(mismatched), "--out", "x_mismatched"],
            "dynamic_hw_with_target": ["export", str(micro), "--out", "x_dynhw", "--target", "ort-cpu",
                                       "--dynamic-hw"],
        }.items()})

        # while those start up: a finished run of recipe.yaml (rerun below with another learning
        # rate) and a real export (exported into again below)
        run_recipe(recipe, root / "finished_run")
        export_model_dir(micro, root / "exported", OnnxExportConfig())
        before = {name: _snapshot(root / name) for name in ("finished_run", "exported")}
        procs["rerun_other_recipe"] = start(["run", str(recipe), "--out", "finished_run",
                                             "--set", "stages.train.optimizer.lr=5e-4"])
        procs["export_exists"] = start(["export", str(micro), "--out", "exported"])
    except BaseException:
        _stop(procs)
        raise
    results: dict[str, tuple[int, str, str]] = {}

    def result(name: str) -> tuple[int, str, str]:
        if name not in results:
            out, err = procs[name].communicate(timeout=300)
            results[name] = (procs[name].returncode, out, err)
        return results[name]

    result.root = root  # type: ignore[attr-defined]
    result.before = before  # type: ignore[attr-defined]
    result.snapshot = lambda name: _snapshot(root / name)  # type: ignore[attr-defined]
    yield result
    _stop(procs)


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("case, needles", [
    ("malformed_yaml", ("malformed YAML", "line 5, column 17")),
    ("unknown_key", ("'stages[0].epocs'", "did you mean 'epochs'")),
    ("unknown_model", ("not_a_model",)),
    ("binary_recipe", ("binary.yaml", "not a text (UTF-8) file")),
    ("model_typo", ("vit_tiny_patch16_2244", "did you mean vit_tiny_patch16_224")),
    ("missing_dataset", ("/nonexistent",)),
    ("corrupt_checkpoint", ("corrupt checkpoint", "model.safetensors")),
    ("mismatched_checkpoint", ("does not match the model",)),
    ("rerun_other_recipe", ("different recipe", "lr")),
    ("export_exists", ("exists already",)),
    ("dynamic_hw_with_target", ("--dynamic-hw applies to the fp32 ONNX export",)),
])
def test_cli_bad_input_is_one_line_exit_2(cli_runs, case, needles):
    rc, _out, err = cli_runs(case)
    assert_one_error_line(rc, err, *needles)
    if case == "dynamic_hw_with_target":  # refused before anything is written (once ignored silently)
        assert not (cli_runs.root / "x_dynhw").exists()


@pytest.mark.slow
def test_cli_config_errors_create_no_run_dir(cli_runs):
    # errors found while parsing leave nothing behind
    for case, out in [("malformed_yaml", "r_malformed"), ("unknown_key", "r_typo"), ("binary_recipe", "r_binary"),
                      ("model_typo", "r_typo_model")]:
        assert cli_runs(case)[0] == 2
        assert not (cli_runs.root / out).exists(), case


@pytest.mark.slow
def test_cli_checkpoint_errors_write_no_export(cli_runs):
    for case, out in [("corrupt_checkpoint", "x_corrupt"), ("mismatched_checkpoint", "x_mismatched")]:
        assert cli_runs(case)[0] == 2
        assert not (cli_runs.root / out / "model.onnx").exists(), case


@pytest.mark.slow
def test_cli_rerun_with_different_recipe_leaves_the_run_untouched(cli_runs):
    assert cli_runs("rerun_other_recipe")[0] == 2
    before = cli_runs.before["finished_run"]
    assert "recipe.yaml" in before and "01-train/summary.json" in before  # the first run finished
    after = cli_runs.snapshot("finished_run")
    assert after["recipe.yaml"] == before["recipe.yaml"]  # byte-identical
    assert after == before  # and nothing else in the run changed either


@pytest.mark.slow
def test_cli_export_into_existing_output_leaves_old_export(cli_runs):
    assert cli_runs("export_exists")[0] == 2
    before = cli_runs.before["exported"]
    assert "model.onnx" in before and "manifest.json" in before
    assert cli_runs.snapshot("exported") == before  # model.onnx untouched, no temp files


def test_cli_run_into_foreign_dir_leaves_it_untouched(tmp_path, capsys):
    from effvision.cli import main

    path = write_recipe(tmp_path / "r.yaml", base_recipe())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["run", str(path), "--out", str(mine)]) == 2
    assert_one_error_line(2, capsys.readouterr().err, "not an effvision run directory")
    assert _snapshot(mine) == {"notes.txt": b"keep me"}


@pytest.mark.slow
def test_cli_nan_loss_stops_with_exit_2_and_keeps_no_later_checkpoint(cli_runs):
    rc, _out, err = cli_runs("nan_loss")
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert err.count(ERROR_PREFIX) == 1, err
    line = err[err.index(ERROR_PREFIX):].splitlines()[0]
    m = re.search(r"loss is (\S+) at epoch (\d+), step (\d+)", line)
    assert m, line
    assert m.group(1) in ("nan", "inf", "-inf"), line
    epoch, step = int(m.group(2)), int(m.group(3))
    steps_per_epoch = 256 // 32
    bad_global_step = epoch * steps_per_epoch + step + 1  # the update whose loss was not finite

    stage = cli_runs.root / "r_nan" / "01-train"
    assert not (stage / "summary.json").exists()
    assert not (stage / "model").exists()
    ckpts = stage / "checkpoints"
    if ckpts.exists():
        steps = [int(p.name.split("-")[1]) for p in ckpts.glob("step-*")]
        assert all(s < bad_global_step for s in steps), (steps, bad_global_step)
        assert not list(ckpts.glob(".step-*")), "a half-written checkpoint was left behind"
        latest = ckpts / "latest"
        if latest.exists():
            target = ckpts / latest.read_text().strip()
            assert target.is_dir() and int(target.name.split("-")[1]) < bad_global_step
            from safetensors.torch import load_file

            weights = load_file(str(target / "weights.safetensors"))
            assert all(bool(v.isfinite().all()) for v in weights.values())
    # the metrics log holds only finite losses, all from before the NaN
    records = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines() if x.strip()]
    for r in records:
        if "loss" in r and "global_step" in r:
            assert math.isfinite(r["loss"]) and r["global_step"] < bad_global_step


@pytest.mark.slow
def test_cli_nan_loss_error_is_its_own_line(cli_runs):
    rc, _out, err = cli_runs("nan_loss")
    assert_one_error_line(rc, err, "loss is", progress_allowed=True)
    # the error is the last thing the user sees
    assert [x for x in err.splitlines() if x.strip()][-1].startswith(ERROR_PREFIX)


def test_fixing_a_bad_model_name_and_rerunning_works(tmp_path, capsys):
    from effvision.cli import main

    path = write_recipe(tmp_path / "r.yaml", base_recipe())
    out = str(tmp_path / "run")
    assert main(["run", str(path), "--out", out, "--set", "model.name=not_a_model"]) == 2
    capsys.readouterr()
    rc = main(["run", str(path), "--out", out])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert (tmp_path / "run" / "01-train" / "summary.json").is_file()


@pytest.mark.parametrize("override, needle", [
    ("stages.train.grad_clip=.nan", "finite number"),
    ("stages.train.scheduler.warmup_lr=.inf", "finite number"),
    ("data.limit_train=-64", "limit_train must be positive"),
    ("data.img_size=0", "img_size must be positive"),
    ("threads=-1", "threads must be positive"),
    ("stages.train.scheduler.name=multistep", "is not one of"),
    ("stages.bench.iters=0", "iters must be positive"),
    ("stages.bench.device=gpu", "is not one of"),
])
def test_values_that_would_fail_late_are_rejected_up_front(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml", [override])


def test_a_run_made_before_a_new_option_still_resumes(tmp_path: Path) -> None:
    """A run dir's recipe.yaml lacks options added to effvision since it was written; they take their
    defaults, so rerunning the same recipe skips the finished stages instead of calling it another recipe."""
    from conftest import tiny_recipe

    from effvision.pipeline import run_recipe

    recipe = tiny_recipe(tmp_path / "r.yaml", data={"limit_train": 128, "limit_eval": 64},
                         stages=[{"type": "train", "epochs": 1, "eval_every": 0}])
    run = run_recipe(recipe, tmp_path / "run")
    stored = yaml.safe_load((run / "recipe.yaml").read_text())
    del stored["data"]["holdout"]  # as written before data.holdout existed
    (run / "recipe.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    before = (run / "01-train" / "summary.json").read_text()
    run_recipe(recipe, run)  # no "different recipe" error; the finished stage is skipped
    assert (run / "01-train" / "summary.json").read_text() == before
    changed = tiny_recipe(tmp_path / "r2.yaml", data={"limit_train": 128, "limit_eval": 64, "holdout": 16},
                          stages=[{"type": "train", "epochs": 1, "eval_every": 0}])
    with pytest.raises(EffVisionError, match="different recipe.*holdout"):
        run_recipe(changed, run)
