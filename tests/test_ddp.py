"""Distributed training: the same recipe on 2 CPU processes (torchrun over gloo; DDP, and FSDP2
killed and resumed) ends where the 1-process run ends, since each step sees the same global batch;
and under FSDP each process holds only its shard of the parameters and optimizer state (DDP, which
ends at the same weights, holds everything on every process)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from conftest import cli, tiny_recipe

# Stochastic depth would draw different masks per process; everything else is identical.
TRAIN = {"epochs": 2, "log_every": 2, "eval_every": 0, "checkpoint_every": 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "effvision", "run", str(recipe), "--out", str(out), *extra]


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant (torchrun starts its workers in their own sessions)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [c for c, p in parents.items() if p in frontier]
        tree += frontier
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


# A trainer extension loaded in every torchrun worker through an entry point (as an installed
# package's would be): after the first update it writes what this rank holds, the parameters'
# and AdamW's exp_avg elements, local (a DTensor's shard) and full.
_PROBE = '''
import json, os
from pathlib import Path
from effvision.engine.extensions import TrainerExtension, register_extension

def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t

def _started(blocks, ts, trainer):
    def record(model, step, total):
        out = Path(os.environ["SHARD_PROBE_DIR"]) / f"rank{ts.dist.rank}.json"
        if out.exists():
            return
        params = list(trainer.model.parameters())
        out.write_text(json.dumps({
            "full": sum(p.numel() for p in params), "local": sum(_local(p).numel() for p in params),
            "exp_avg_local": sum(_local(s["exp_avg"]).numel() for s in trainer.optimizer.state.values())}))
    ts.hooks.after_step.append(record)
    return {}

register_extension(TrainerExtension("shard_probe", {}, lambda blocks, ts: None, always=True, started=_started))
'''


def _probe_site(root: Path) -> Path:
    """The probe as an installed package: its module and the entry point pip would write."""
    (root / "shard_probe").mkdir(parents=True)
    (root / "shard_probe" / "__init__.py").write_text("")
    (root / "shard_probe" / "plugin.py").write_text(_PROBE)
    dist = root / "shard_probe-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shard-probe\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[effvision.plugins]\nshard_probe = shard_probe.plugin\n")
    return root


def _probe_env(site: Path, out: Path) -> dict[str, str]:
    """The environment under which every worker loads the probe, which writes to ``out``."""
    out.mkdir()
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "SHARD_PROBE_DIR": str(out)}


def _held(out: Path) -> list[dict[str, int]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _weights(run: Path) -> dict:
    return load_file(str(run / "01-train" / "model" / "model.safetensors"))


def test_two_process_ddp_and_fsdp_match_one_process(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "r.yaml", train=TRAIN, deterministic=False)
    one = tmp_path / "one"
    r = cli("run", str(recipe), "--out", str(one), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr

    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    site = _probe_site(tmp_path / "site")
    r = subprocess.run(_torchrun(recipe, two), capture_output=True, text=True, timeout=600,
                       env=_probe_env(site, tmp_path / "held-ddp"))
    assert r.returncode == 0, r.stderr[-3000:]

    summary = json.loads((two / "01-train" / "summary.json").read_text())
    assert summary["world_size"] == 2
    a, b = _weights(one), _weights(two)
    # Two half-batch gradient means averaged by all-reduce equal the full-batch mean up to float
    # rounding; 16 AdamW steps keep that well under 1e-4.
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, f"2-process weights differ from 1-process by {worst}"
    one_sum = json.loads((one / "01-train" / "summary.json").read_text())
    assert abs(one_sum["top1"] - summary["top1"]) < 1.0
    # Only rank 0 wrote: one metrics file, one set of checkpoints.
    assert len(list((two / "01-train" / "checkpoints").glob("step-*"))) == 1
    n_params = sum(v.numel() for v in a.values())  # the 1-process model's
    # DDP: every process holds every parameter and its full optimizer state.
    assert all(h["full"] == h["local"] == h["exp_avg_local"] == n_params for h in _held(tmp_path / "held-ddp"))

    # FSDP2: parameters and optimizer state sharded over the 2 processes, killed after its first
    # checkpoint and resumed from it (full weights and optimizer state gathered into the files).
    fsdp_recipe = tiny_recipe(tmp_path / "fsdp.yaml", train={**TRAIN, "distributed": "fsdp"}, deterministic=False)
    fsdp = tmp_path / "fsdp"
    proc = subprocess.Popen(_torchrun(fsdp_recipe, fsdp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    latest, deadline = fsdp / "01-train" / "checkpoints" / "latest", time.time() + 300
    while not latest.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    _kill_tree(proc.pid)  # the launcher and both workers, as a lost machine would
    proc.wait()
    assert not (fsdp / "01-train" / "summary.json").exists(), "the FSDP run finished before it could be killed"
    r = subprocess.run(_torchrun(fsdp_recipe, fsdp, "--resume"), capture_output=True, text=True, timeout=600,
                       env=_probe_env(site, tmp_path / "held-fsdp"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming at epoch" in r.stdout
    # Sharded: each process holds about half the parameters and their AdamW state, and the two shards
    # add up to the model (dim 0 split in two; cls_token and pos_embed, one row each, stay on rank 0).
    held = _held(tmp_path / "held-fsdp")
    assert all(h["full"] == n_params for h in held)
    assert sum(h["local"] for h in held) == n_params and sum(h["exp_avg_local"] for h in held) == n_params
    assert all(0.4 * n_params < h["local"] == h["exp_avg_local"] < 0.6 * n_params for h in held), held
    c = _weights(fsdp)  # a plain timm state dict again, not shards
    assert c.keys() == a.keys()
    worst = max(float((a[k] - c[k]).abs().max()) for k in a)
    assert worst < 1e-4, f"FSDP weights (killed and resumed) differ from 1-process by {worst}"
