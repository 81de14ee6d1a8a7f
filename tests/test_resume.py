"""Checkpoint/resume exactness: a run killed with SIGKILL at arbitrary points and resumed
ends with the same weights, bit for bit, as an uninterrupted run (CPU, deterministic)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import cli, tiny_recipe
from effvision.dirlock import LOCK_FILE

# drop_path and mixup draw random numbers every step, so the RNG state and the data position
# must both come back exactly for the weights to match.
TRAIN = {"epochs": 6, "checkpoint_every": 3, "log_every": 2, "eval_every": 0}
MODEL = {"kwargs": {"drop_path_rate": 0.1}}
DATA = {"augment": {"crop_padding": 2, "hflip": False, "mixup": 0.2, "mix_prob": 0.5}}


def _latest_step(run: Path, stage: str = "01-train") -> int:
    latest = run / stage / "checkpoints" / "latest"
    try:
        return int(latest.read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return -1


def _start_and_kill(recipe: Path, run: Path, after_step: int, resume: bool, stage: str = "01-train") -> None:
    """Start a run and SIGKILL it as soon as a checkpoint of ``stage`` past ``after_step`` exists."""
    cmd = [sys.executable, "-m", "effvision", "run", str(recipe), "--out", str(run)] + (["--resume"] if resume else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.time() + 300
    while _latest_step(run, stage) <= after_step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / stage / "summary.json").exists(), "the run finished before it could be killed"
    # Its lock file stays behind; the lock itself died with the process and must not block a resume.
    assert (run / LOCK_FILE).is_file()


def _weights(run: Path, stage: str = "01-train") -> dict[str, torch.Tensor]:
    return load_file(str(run / stage / "model" / "model.safetensors"))


def test_sigkill_and_resume_is_bit_exact(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "r.yaml", train=TRAIN, model=MODEL, data=DATA)
    clean = tmp_path / "clean"
    r = cli("run", str(recipe), "--out", str(clean))
    assert r.returncode == 0, r.stderr

    killed = tmp_path / "killed"
    _start_and_kill(recipe, killed, after_step=0, resume=False)
    first = _latest_step(killed)
    # Without --resume the interrupted stage is not silently restarted or overwritten.
    r = cli("run", str(recipe), "--out", str(killed))
    assert r.returncode == 2 and "--resume" in r.stderr
    _start_and_kill(recipe, killed, after_step=first + 3, resume=True)
    assert _latest_step(killed) > first
    r = cli("run", str(recipe), "--out", str(killed), "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming at epoch" in r.stdout

    a, b = _weights(clean), _weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill+resume"
    # And training moved the weights at all (the comparison is not between two inits).
    init = tiny_recipe(tmp_path / "init.yaml", train={**TRAIN, "epochs": 1}, model=MODEL, data=DATA)
    assert cli("run", str(init), "--out", str(tmp_path / "short")).returncode == 0
    short = _weights(tmp_path / "short")
    assert any(not torch.equal(a[k], short[k]) for k in a)


def test_checkpoint_state_loads_without_pickle(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "r.yaml", train={"epochs": 1})
    run = tmp_path / "run"
    assert cli("run", str(recipe), "--out", str(run)).returncode == 0
    ckpt_dir = run / "01-train" / "checkpoints"
    ckpt = ckpt_dir / (ckpt_dir / "latest").read_text().strip()
    state = torch.load(ckpt / "state.pt", weights_only=True)  # raises if anything needs unpickling
    assert {"optimizer", "rng", "position"} <= state.keys()
    assert state["position"]["global_step"] == 8  # 512 samples / batch 64
    assert not list(ckpt_dir.glob(".*tmp*")), "temporary checkpoint files left behind"


def test_finetune_with_feature_distillation_resumes_mid_stage_bit_exact(tmp_path: Path) -> None:
    # The feature projection is trained with the student: it must come back from the checkpoint.
    stages = [{"type": "train", "epochs": 1, "log_every": 4},
              {"type": "finetune", "epochs": 4, "checkpoint_every": 3, "log_every": 2, "eval_every": 0,
               "optimizer": {"name": "adamw", "lr": 1.0e-3},
               "distill": {"teacher": "01-train", "kind": "soft", "feature_weight": 1.0}}]
    recipe = tiny_recipe(tmp_path / "r.yaml", stages=stages, model=MODEL, data={"limit_train": 256, **DATA})
    clean = tmp_path / "clean"
    r = cli("run", str(recipe), "--out", str(clean))
    assert r.returncode == 0, r.stderr

    killed = tmp_path / "killed"
    _start_and_kill(recipe, killed, after_step=3, resume=False, stage="02-finetune")
    assert _latest_step(killed, "02-finetune") < 16
    r = cli("run", str(recipe), "--out", str(killed), "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming at epoch" in r.stdout

    a, b = _weights(clean, "02-finetune"), _weights(killed, "02-finetune")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill+resume of the finetune stage"
    assert any(not torch.equal(a[k], v) for k, v in _weights(clean).items())  # finetuning changed the weights
