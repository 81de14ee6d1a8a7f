"""What a run guarantees on a shared machine: one writer per run directory (an OS lock that
dies with its process), and a stop signal (SIGTERM, SIGUSR1) that checkpoints the current step
so that ``--resume`` ends bit-identical to a run never stopped. Real ``effvision run``
processes, real signals."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import effvision as ev

from conftest import cli, tiny_recipe
from effvision.dirlock import LOCK_FILE, DirectoryBusy, DirLock
from effvision.engine.preemption import PREEMPTED_EXIT


def _start(recipe: Path, run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "effvision", "run", str(recipe), "--out", str(run), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _logged_steps(run: Path) -> int:
    path = run / "01-train" / "metrics.jsonl"
    try:
        return max((json.loads(r).get("global_step", 0) for r in path.read_text().splitlines() if r.strip()),
                   default=0)
    except (OSError, ValueError):  # not yet written, or a line being written
        return 0


def _latest_step(run: Path) -> int:
    return int((run / "01-train" / "checkpoints" / "latest").read_text().strip().split("-")[1])


def _holder_pid(run: Path) -> int | None:
    try:
        return json.loads((run / LOCK_FILE).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_one_writer_per_run_dir_and_a_full_disk_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    # One step per epoch and many epochs: the first run stays alive while the others try.
    recipe = tiny_recipe(tmp_path / "r.yaml", train={"epochs": 10_000, "eval_every": 0, "log_every": 1},
                         data={"limit_train": 64})
    run = tmp_path / "run"
    first = _start(recipe, run)
    try:
        _wait_for(lambda: _logged_steps(run) >= 1, first, "the first step")
        assert _holder_pid(run) == first.pid
        model_dir = ev.save(timm.create_model("vit_micro_patch4_32", num_classes=10), tmp_path / "model")
        top = sorted(p.name for p in run.iterdir())
        for args in (("run", str(recipe), "--out", str(run)),                  # started twice
                     ("run", str(recipe), "--out", str(run), "--resume"),      # a requeued copy of a live job
                     ("export", str(model_dir), "--out", str(run))):           # an export into it
            t0 = time.perf_counter()
            r = cli(*args)
            assert r.returncode == 2, (args, r.stderr)
            line = r.stderr.strip()
            assert "\n" not in line and f"pid {first.pid}" in line and "in use" in line, line
            assert time.perf_counter() - t0 < 30, "a second writer must fail at once, not wait"
        assert first.poll() is None, "the first run was disturbed"
        assert sorted(p.name for p in run.iterdir()) == top and not list(run.rglob("*.onnx"))
        # Then the disk fills (the kernel's file-size limit stands in: the same failed write(), no
        # privileges needed), below the size of the weights file of the next checkpoint.
        ckpts = run / "01-train" / "checkpoints"
        _wait_for(lambda: (ckpts / "latest").is_file(), first, "a checkpoint")
        saved = _latest_step(run)
        resource.prlimit(first.pid, resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
        _, err = first.communicate(timeout=120)
        assert first.returncode == 2, err[-2000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith("effvision: error: File too large while writing") and "--resume" in line, line
        assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")], "a failed write left temporary files"
        newest = ckpts / (ckpts / "latest").read_text().strip()  # complete, and what --resume reads
        assert _latest_step(run) >= saved and load_file(str(newest / "weights.safetensors"))
        assert torch.load(newest / "state.pt", weights_only=True)["position"]["global_step"] == _latest_step(run)
        assert not (run / LOCK_FILE).exists(), "the lock goes with the run that held it"
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_a_lock_left_by_a_killed_process_never_blocks(tmp_path: Path) -> None:
    d = tmp_path / "d"
    code = (f"import sys, time; from effvision.dirlock import DirLock; DirLock({str(d)!r}).acquire(); "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryBusy, match=f"pid {holder.pid} on "):
            DirLock(d).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert (d / LOCK_FILE).exists()  # the stale file stays; the kernel's lock went with the process
    with DirLock(d):
        assert _holder_pid(d) == os.getpid()
    assert d.is_dir() and not list(d.iterdir()), "the lock file goes on release; a folder it did not make stays"
    with DirLock(tmp_path / "new"):
        pass
    assert not (tmp_path / "new").exists(), "a lock that made its folder and saw nothing written removes both"


def test_sigterm_mid_epoch_checkpoints_and_resume_is_bit_exact(tmp_path: Path) -> None:
    # No periodic checkpoint inside an epoch (4 steps each): one mid-epoch can only come from the signal.
    # drop_path and mixup draw random numbers every step: the RNG must come back exactly too.
    train = {"epochs": 3, "checkpoint_every": 0, "log_every": 1, "eval_every": 0}
    model = {"kwargs": {"drop_path_rate": 0.1}}
    data = {"limit_train": 256, "augment": {"crop_padding": 2, "hflip": False, "mixup": 0.2}}
    recipe = tiny_recipe(tmp_path / "r.yaml", train=train, model=model, data=data)
    clean = tmp_path / "clean"
    assert cli("run", str(recipe), "--out", str(clean)).returncode == 0

    run = tmp_path / "stopped"
    proc = _start(recipe, run)
    _wait_for(lambda: _logged_steps(run) >= 2, proc, "two steps")
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # a second signal (an impatient scheduler) changes nothing
    seen = _logged_steps(run)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, err[-2000:]
    stopped_at = _latest_step(run)
    assert stopped_at >= seen, "steps done before the signal were lost"
    assert not (run / "01-train" / "summary.json").exists()

    r = cli("run", str(recipe), "--out", str(run), "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming at epoch" in r.stdout
    a = load_file(str(clean / "01-train" / "model" / "model.safetensors"))
    b = load_file(str(run / "01-train" / "model" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after SIGTERM + resume (stopped after update {stopped_at})"
    if stopped_at % 4:  # the usual case: the signal landed mid-epoch and its own checkpoint kept the steps
        assert "stopped by SIGTERM after update" in err

