"""gpu_bench section "token_drop": random-LTD on the CIFAR-10 reference recipe.

1. Time to the dense recipe's final accuracy with random-LTD (target <= 0.7x dense's training
   time), from per-epoch evaluations (evaluation is off the clock).
2. Accuracy at fixed training budgets (``budget_s`` 60 s and 120 s) for dense, random-LTD,
   curriculum (progressive resizing, effvision.curriculum) and both; under a budget every
   schedule (LR, kept tokens, resolution) runs on the budget clock.
3. A plot: test accuracy against training wall-clock for every run (PNG in the runs dir).
Runs that would end past ``args.deadline`` are skipped (a row says so).
``args.toy``: the same runs on a slice of digits on the CPU, seconds each (the CPU test).
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

__all__ = ["token_drop_section", "token_drop_markdown"]

RECIPE = Path("recipes/cifar10_vit_tiny.yaml")
TOKEN_DROP = {"start_tokens": 32, "schedule_steps": 2000, "buckets": 4, "layer_token_lr": True}
CURRICULUM = {"metric": "resolution", "start": 0.5, "pacing": "linear"}  # 16 -> 32 px over the first half
BUDGETS = (60.0, 120.0)
OVERHEAD_S = 45.0  # a budget run's start-up, evaluations and checkpoints on top of its budget


def _base(args: argparse.Namespace) -> dict[str, Any]:
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["data"]["root"] = args.data
    recipe["stages"] = recipe["stages"][:1]          # training only: the clock is the figure
    recipe["stages"][0]["eval_every"] = 1            # the accuracy-vs-time curve (eval is off the clock)
    if getattr(args, "toy", False):
        recipe.update(device="cpu", model={"name": "vit_micro_patch4_32", "kwargs": {"depth": 3}})
        recipe["data"] = {"name": "digits", "img_size": 32, "batch_size": 64, "limit_train": 128, "limit_eval": 64,
                          "augment": {"crop_padding": 2, "hflip": False}}
        recipe["stages"][0].update(epochs=2, compile=False, channels_last=False, eval_tta_flip=False, log_every=1,
                                   optimizer={"name": "adamw", "lr": 2.0e-3},
                                   scheduler={"name": "cosine", "warmup_epochs": 1})
    return recipe


def _run(args: argparse.Namespace, label: str, recipe: dict[str, Any]) -> dict[str, Any]:
    run_dir = Path(args.runs) / f"token_drop-{args.stamp}-{label.replace(' ', '_')}"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "effvision", "run", str(path), "--out", str(run_dir)])
    row: dict[str, Any] = {"variant": label, "exit_code": proc.returncode, "wall_s": time.perf_counter() - t0}
    summary = run_dir / "01-train" / "summary.json"
    if not summary.is_file():
        return {**row, "error": f"exit {proc.returncode}"}
    s = json.loads(summary.read_text())
    curve = []
    for line in (run_dir / "01-train" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("eval"):
            curve.append((r["train_time_s"], r["top1"]))  # the training clock at this evaluation
    row.update(top1=s.get("top1"), train_time_s=s.get("train_time_s"), train_img_per_s=s.get("train_img_per_s"),
               budget_s=s.get("budget_s"), steps_done=s.get("steps_done"), curve=curve)
    print(f"  token_drop {label}: {row['top1']}% in {row['train_time_s']} s", flush=True)
    return row


def _plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r.get("curve"):
            ax.plot(*zip(*r["curve"]), marker="o", label=r["variant"])
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax.set_ylabel("test top-1 (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def token_drop_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = _base(args)
    toy = getattr(args, "toy", False)
    drop = {**TOKEN_DROP, "start_tokens": 16, "schedule_steps": 3} if toy else TOKEN_DROP
    budgets = (0.5,) if toy else BUDGETS  # toy: shorter than the 16-step upper bound even on a quiet CPU
    variants: list[tuple[str, dict[str, Any]]] = [("dense", {}), ("random-LTD", {"token_drop": drop})]
    on_budget = {**drop, "schedule_steps": 0}  # under budget_s: all tokens from half the budget on
    for b in budgets:
        variants += [(f"dense {b:g}s", {"budget_s": b}),
                     (f"random-LTD {b:g}s", {"budget_s": b, "token_drop": on_budget}),
                     (f"curriculum {b:g}s", {"budget_s": b, "curriculum": CURRICULUM}),
                     (f"random-LTD+curriculum {b:g}s",
                      {"budget_s": b, "token_drop": on_budget, "curriculum": CURRICULUM})]
    deadline = getattr(args, "deadline", None)
    rows = []
    for label, extra in variants:
        if deadline is not None and "budget_s" in extra and time.time() + extra["budget_s"] + OVERHEAD_S > deadline:
            rows.append({"variant": label, "budget_s": extra["budget_s"], "error": "skipped: out of section time"})
            continue
        recipe = copy.deepcopy(base)
        recipe["stages"][0].update(extra)
        if "budget_s" in extra:
            recipe["stages"][0]["epochs"] *= 4  # an upper bound: the budget stops training
        rows.append(_run(args, label, recipe))
    dense, ltd = rows[0], rows[1]
    if dense.get("top1") is not None and ltd.get("curve"):
        reached = [t for t, acc in ltd["curve"] if acc >= dense["top1"]]
        ratio = reached[0] / dense["train_time_s"] if reached and dense["train_time_s"] else None
        rows.append({"variant": "time to dense accuracy", "target_top1": dense["top1"], "ratio": ratio,
                     "target_met": ratio is not None and ratio <= 0.7})
    plot = Path(args.runs) / f"token_drop-{args.stamp}.png"
    _plot(rows, plot)
    print(f"  token_drop plot: {plot}", flush=True)
    return rows


def token_drop_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| variant | budget s | top-1 | train s | img/s | steps |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["variant"] == "time to dense accuracy":
            lines.append(f"| time to dense top-1 {r['target_top1']}: random-LTD / dense = {r['ratio']} "
                         f"(target <= 0.7: {r['target_met']}) | | | | | |")
        else:
            lines.append(f"| {r['variant']} | {r.get('budget_s') or ''} | {r.get('top1', r.get('error'))} | "
                         f"{r.get('train_time_s')} | {r.get('train_img_per_s')} | {r.get('steps_done') or ''} |")
    return lines + [""]
