"""`effvision prune DIR` / `effvision quantize DIR`: compression for people who start from a saved
model, not a recipe. Each writes and runs a one-stage recipe, kept in the run dir."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from effvision.cli import main

from conftest import cli, tiny_recipe


def test_prune_and_quantize_a_saved_model_dir(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "r.yaml", train={"epochs": 1})
    assert cli("run", str(recipe), "--out", str(tmp_path / "base")).returncode == 0
    model = tmp_path / "base" / "01-train" / "model"

    r = cli("prune", str(model), "--mlp", "0.5", "--out", str(tmp_path / "pruned"), "--set", "data.limit_train=256",
            "--set", "data.limit_eval=128")
    assert r.returncode == 0, r.stderr
    pruned = json.loads((tmp_path / "pruned" / "01-prune" / "summary.json").read_text())
    assert pruned["macs_fraction"] < 1.0
    assert (tmp_path / "pruned" / "02-eval" / "summary.json").is_file()
    ran = yaml.safe_load((tmp_path / "pruned" / "recipe.yaml").read_text())
    assert ran["model"]["init_from"] == str(model) and ran["stages"][0]["mlp"] == 0.5
    assert "effvision run" in r.stdout  # says how to rerun it

    r = cli("quantize", str(tmp_path / "pruned" / "01-prune" / "model"), "--out", str(tmp_path / "int8"),
            "--calib-batches", "2", "--set", "data.limit_train=256", "--set", "data.limit_eval=128")
    assert r.returncode == 0, r.stderr
    q = json.loads((tmp_path / "int8" / "01-quantize" / "summary.json").read_text())
    assert q["precision"] == "int8" and q["target"] == "tensorrt"  # QuantConfig's default: one for CLI, API, recipes
    # the quantized dir's record holds both modes in order: pruned by the first run, then quantized
    spec = json.loads((tmp_path / "int8" / "01-quantize" / "model" / "model.json").read_text())
    assert [m["mode"] for m in spec["modes"]] == ["prune", "quantize"]
    assert (tmp_path / "int8" / "02-export" / "model.onnx").is_file()


def test_prune_without_a_model_or_ratio_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", str(tmp_path / "nope"), "--mlp", "0.5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model in" in err
    assert main(["prune", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "--ratio" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
