"""GaLore through the recipe path, as a user runs it: `effvision run` with galore_adamw in
per-layer mode, bad input, and the shipped CIFAR-10 GaLore recipe on a CPU slice."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, SHARED, cli, needs_shared, tiny_recipe

GALORE = {"name": "galore_adamw", "lr": 3.0e-3, "rank": 16, "update_proj_gap": 4, "layerwise": True}
# one thread: on this shared 2-core machine a 2-thread LAPACK SVD ran 100x slower (contention)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_layerwise_galore_through_the_trainer_equals_global(tmp_path: Path) -> None:
    """The trainer with per-layer updates ends with exactly the metrics of the same recipe with
    one global step (the trainer calls neither step nor zero_grad on stepped parameters)."""
    runs = {}
    for layerwise in (True, False):
        recipe = tiny_recipe(tmp_path / f"r{layerwise}.yaml", train={
            "optimizer": {**GALORE, "layerwise": layerwise}, "checkpoint_every": 6, "log_every": 2})
        run = tmp_path / f"run{layerwise}"
        r = cli("run", str(recipe), "--out", str(run), env=ONE_THREAD)
        assert r.returncode == 0, r.stderr[-3000:]
        logs = [json.loads(x) for x in (run / "01-train" / "metrics.jsonl").read_text().splitlines()]
        runs[layerwise] = [(x.get("loss"), x.get("top1")) for x in logs]
    assert runs[True] == runs[False]
    # the checkpoint holds the GaLore state as plain tensors (resume: test_galore.py's round trip)
    assert any((run / "01-train" / "checkpoints").iterdir())


def test_bad_galore_input_is_one_line_exit_2(tmp_path: Path) -> None:
    # (rank <= 0, patterns matching nothing, ...: the same path, covered in-process in test_galore.py)
    for opt, expect in (({**GALORE, "rank": 500}, "rank 500 exceeds min(m, n)"),):
        run = tmp_path / f"run{opt['rank']}{len(opt.get('targets', []))}"
        r = cli("run", str(tiny_recipe(tmp_path / "bad.yaml", train={"optimizer": opt})), "--out", str(run),
                env=ONE_THREAD)
        assert r.returncode == 2, r.stderr[-2000:]
        assert expect in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = cli("run", str(tiny_recipe(tmp_path / "clip.yaml", train={"optimizer": GALORE, "grad_clip": 1.0})),
            "--out", str(tmp_path / "clip"))
    assert r.returncode == 2 and "grad_clip cannot be combined" in r.stderr
    assert not (tmp_path / "clip").exists()  # refused before anything was written


@pytest.mark.slow
@needs_shared
def test_cifar10_galore_recipe_runs_on_a_cpu_slice(tmp_path: Path) -> None:
    run = tmp_path / "c10"
    r = cli("run", str(REPO / "recipes" / "cifar10_vit_galore.yaml"), "--out", str(run),
            "--set", f"data.root={SHARED / 'datasets' / 'cifar10'}", "--set", "device=cpu",
            "--set", "data.limit_train=256", "--set", "data.batch_size=128", "--set", "data.limit_eval=100",
            "--set", "data.eval_batch_size=100",
            "--set", "stages.train.epochs=1", "--set", "stages.train.scheduler.warmup_epochs=0.5",
            "--set", "stages.train.compile=false", "--set", "stages.train.channels_last=false",
            env={"HOME": str(tmp_path), **ONE_THREAD})
    assert r.returncode == 0, r.stderr[-3000:]
    train = json.loads((run / "01-train" / "summary.json").read_text())
    assert train["model"] == "convvit_small_32" and train["epochs"] == 1
