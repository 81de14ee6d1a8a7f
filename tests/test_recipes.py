"""The shipped recipes parse, build their models, and (the GPU one) run end to end on a small
CPU slice of the real CIFAR-10, so the GPU machine never meets a broken recipe."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from effvision.recipe import load_recipe
from effvision.engine.stage import recipe_spec
from effvision.models.io import create_model

from conftest import REPO, SHARED, cli, needs_shared

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses_and_builds_its_model(path: Path) -> None:
    recipe = load_recipe(path)
    # finetune: distilled from scratch
    assert recipe.stages and recipe.stages[0].type in ("train", "train_detection", "finetune", "meta")  # meta: assembling
    model = create_model(recipe_spec(recipe))
    assert sum(p.numel() for p in model.parameters()) > 0


@needs_shared
def test_cifar10_reference_recipe_runs_on_a_cpu_slice(tmp_path: Path) -> None:
    run = tmp_path / "c10"
    r = cli("run", str(REPO / "recipes" / "cifar10_vit_tiny.yaml"), "--out", str(run),
            "--set", f"data.root={SHARED / 'datasets' / 'cifar10'}", "--set", "device=cpu",
            "--set", "data.limit_train=512", "--set", "data.limit_eval=200", "--set", "data.eval_batch_size=200",
            "--set", "stages.train.epochs=1", "--set", "stages.train.scheduler.warmup_epochs=0.5",
            "--set", "stages.train.compile=false",
            "--set", "stages.train.channels_last=false", "--set", "stages.train.optimizer.kwargs.fused=false",
            env={"HOME": str(tmp_path)})  # the decode cache lands in tmp_path/.cache
    assert r.returncode == 0, r.stderr[-3000:]
    train = json.loads((run / "01-train" / "summary.json").read_text())
    assert train["model"] == "convvit_small_32" and train["epochs"] == 1
    ev = json.loads((run / "02-eval" / "summary.json").read_text())
    assert ev["samples"] == 200
    assert json.loads((run / "03-export" / "summary.json").read_text())["parity"]["max_abs_error"] <= 1e-4


@needs_shared
def test_cifar10_prune_distill_recipe_runs_on_a_cpu_slice(tmp_path: Path) -> None:
    """recipes/cifar10_vit_prune_distill.yaml end to end (train, prune, distill, eval, export, bench)."""
    run = tmp_path / "c10p"
    sets = [f"data.root={SHARED / 'datasets' / 'cifar10'}", "device=cpu", "data.limit_train=256",
            "data.limit_eval=100", "data.eval_batch_size=100", "data.batch_size=64",
            "stages.train.epochs=1", "stages.train.scheduler.warmup_epochs=0.5", "stages.train.compile=false",
            "stages.train.channels_last=false", "stages.train.optimizer.kwargs.fused=false",
            "stages.prune.calib_batches=1", "stages.finetune.epochs=1", "stages.finetune.scheduler.warmup_epochs=0.5",
            "stages.finetune.channels_last=false", "stages.finetune.optimizer.kwargs.fused=false",
            "stages.bench.device=cpu", "stages.bench.batch_size=8", "stages.bench.iters=2", "stages.bench.warmup=1"]
    r = cli("run", str(REPO / "recipes" / "cifar10_vit_prune_distill.yaml"), "--out", str(run),
            *[a for s in sets for a in ("--set", s)], env={"HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    prune = json.loads((run / "02-prune" / "summary.json").read_text())
    assert prune["macs_fraction"] <= 0.5
    assert json.loads((run / "03-finetune" / "summary.json").read_text())["distill"] == "soft"
    assert "torch" in json.loads((run / "06-bench" / "summary.json").read_text())["speedup_vs_baseline"]
