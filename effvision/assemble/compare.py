"""Assembled (meta -> K incubate jobs -> assemble -> finetune) vs the same target trained end to
end, at equal training compute, run through the CLI as a user would (the K incubate jobs run one
after another here; the K-machine wall-clock is meta + the slowest job + assemble + finetune).

Compute is counted in block-epochs (epochs x blocks the batch passes through, forward and
backward: gradients reach module i only through the frozen blocks after it): the end-to-end run
costs E x D. The assembled run spends 15% of that on the meta model (K blocks), 25% on the
finetune (D blocks) and the rest on the K incubations (K - 1 + D/K blocks each).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

__all__ = ["assembled_stages", "compare_assembled"]


def assembled_stages(train: dict[str, Any], epochs: int, depth: int, modules: int) -> tuple[list[dict[str, Any]], float]:
    """The stages of the assembled run at the compute of ``epochs`` end-to-end epochs, and the
    compute they really use (rounding) as a fraction of it."""
    budget, n = epochs * depth, depth // modules
    meta = max(1, round(0.15 * budget / modules))
    finetune = max(1, round(0.25 * budget / depth))
    incubate = max(1, round((budget - meta * modules - finetune * depth) / (modules * (modules - 1 + n))))
    used = meta * modules + modules * incubate * (modules - 1 + n) + finetune * depth
    stages = [{**train, "type": "meta", "modules": modules, "epochs": meta}]
    stages += [{**train, "type": "incubate", "modules": modules, "module": i, "epochs": incubate} for i in range(modules)]
    stages += [{"type": "assemble"}, {**train, "type": "finetune", "epochs": finetune}]
    return stages, used / budget


def _run(recipe: dict[str, Any], run_dir: Path) -> tuple[int, float]:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "effvision", "run", str(path), "--out", str(run_dir)])
    return proc.returncode, time.perf_counter() - t0


def _summary(run_dir: Path, stage: str) -> dict[str, Any]:
    path = run_dir / stage / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def compare_assembled(recipe: dict[str, Any], train: dict[str, Any], epochs: int, depth: int, modules: list[int],
                      runs: Path, tag: str) -> list[dict[str, Any]]:
    """Rows: the end-to-end run, then one per K (accuracy, wall-clocks, compute used)."""
    rows = []
    e2e = Path(runs) / f"{tag}-end2end"
    code, wall = _run({**recipe, "stages": [{**train, "type": "train", "epochs": epochs}]}, e2e)
    s = _summary(e2e, "01-train")
    rows.append({"variant": "end to end", "modules": 1, "epochs": epochs, "top1": s.get("top1"), "exit_code": code,
                 "train_s": s.get("train_time_s"), "wall_s": wall, "wall_k_machines_s": wall, "compute": 1.0})
    for k in modules:
        stages, compute = assembled_stages(train, epochs, depth, k)
        run = Path(runs) / f"{tag}-assembled-k{k}"
        code, wall = _run({**recipe, "stages": stages}, run)
        walls = [_summary(run, f"{i + 1:02d}-{st['type']}").get("wall_time_s", 0.0) for i, st in enumerate(stages)]
        inc = walls[1:1 + k]
        last = _summary(run, f"{len(stages):02d}-finetune")
        rows.append({"variant": f"assembled K={k}", "modules": k, "epochs": [st.get("epochs") for st in stages],
                     "top1": last.get("top1"), "exit_code": code, "train_s": sum(walls), "wall_s": wall,
                     "wall_k_machines_s": sum(walls) - sum(inc) + max(inc, default=0.0), "compute": compute})
        print(f"  assemble K={k}: top1 {rows[-1]['top1']} (exit {code}), {wall:.0f} s", flush=True)
    return rows


def compare_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| run | epochs (meta, incubate x K, -, finetune) | compute vs end to end | test top-1 | "
             "stage time, sequential (s) | wall-clock on K machines (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        top1 = f"{r['top1']:.2f}%" if r.get("top1") is not None else f"failed (exit {r['exit_code']})"
        lines.append(f"| {r['variant']} | {r['epochs']} | {r['compute']:.2f} | {top1} | {r['train_s'] or 0:.1f} | "
                     f"{r['wall_k_machines_s']:.1f} |")
    return lines
