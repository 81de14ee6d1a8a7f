"""Distributed training: the same recipe on 2 CPU processes (torchrun, DDP over gloo) ends
where the 1-process run ends, since each step sees the same global batch."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from conftest import cli, tiny_recipe

# Stochastic depth would draw different masks per process; everything else is identical.
TRAIN = {"epochs": 2, "log_every": 2, "eval_every": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "r.yaml", train=TRAIN, deterministic=False)
    one = tmp_path / "one"
    r = cli("run", str(recipe), "--out", str(one), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr

    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "effvision", "run", str(recipe), "--out", str(two)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]

    summary = json.loads((two / "01-train" / "summary.json").read_text())
    assert summary["world_size"] == 2
    a = load_file(str(one / "01-train" / "model" / "model.safetensors"))
    b = load_file(str(two / "01-train" / "model" / "model.safetensors"))
    # Two half-batch gradient means averaged by all-reduce equal the full-batch mean up to float
    # rounding; 16 AdamW steps keep that well under 1e-4.
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, f"2-process weights differ from 1-process by {worst}"
    one_sum = json.loads((one / "01-train" / "summary.json").read_text())
    assert abs(one_sum["top1"] - summary["top1"]) < 1.0
    # Only rank 0 wrote: one metrics file, one set of checkpoints.
    assert len(list((two / "01-train" / "checkpoints").glob("step-*"))) == 1
