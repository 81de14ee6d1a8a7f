"""gpu_bench section ``prune_distill``: recipes/cifar10_vit_prune_distill.yaml (train, prune to
half the MACs, distill), per pruning criterion."""
from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from ..benchmarks.registry import derive_recipe, fmt, run_recipe, seconds_left, summaries

__all__ = ["prune_distill_section", "prune_distill_markdown"]


PRUNE_RECIPE = "recipes/cifar10_vit_prune_distill.yaml"
PRUNE_CRITERIA = ("taylor", "l2", "obd")
# Full recipe estimate on one H100-class GPU: 40 + 20 epochs at ~20k img/s (2.5 s/epoch), plus
# ~60 s of decode, compiles and pruning. With less time the epochs shrink in proportion.
EPOCH_S, OVERHEAD_S = 2.5, 60.0


def _fit_epochs(recipe: dict[str, Any], budget_s: float) -> float:
    """Scale train/finetune epochs so the run fits ``budget_s``; returns the factor (1 = full)."""
    stages = [s for s in recipe["stages"] if s["type"] in ("train", "finetune")]
    full = OVERHEAD_S + EPOCH_S * sum(s["epochs"] for s in stages)
    factor = min(1.0, max(budget_s - OVERHEAD_S, 0.0) / (full - OVERHEAD_S))
    if factor < 1.0:
        for s in stages:
            s["epochs"] = max(2, int(s["epochs"] * factor))
            s["scheduler"]["warmup_epochs"] = min(s["scheduler"].get("warmup_epochs", 0), s["epochs"] / 4)
    return factor


def prune_distill_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """recipes/cifar10_vit_prune_distill.yaml (criterion taylor), then l2 and obd pruned from the
    same dense model while time is left: accuracy at 50% MACs and bf16 img/s, pruned vs dense.
    With less time than the full recipe needs, its epochs shrink (the rows say by how much)."""
    toy = getattr(args, "toy", False)
    criteria = PRUNE_CRITERIA[:2] if toy else PRUNE_CRITERIA
    base = derive_recipe(PRUNE_RECIPE, args, keep=("train", "prune", "finetune", "bench"))  # the CPU tests run eval/export
    factor = 1.0 if toy else _fit_epochs(base, 0.7 * seconds_left(args))  # the other criteria share the rest
    first = Path(args.runs) / f"prune-{args.stamp}-{criteria[0]}"
    rows: list[dict[str, Any]] = []
    for criterion in criteria:
        r = copy.deepcopy(base)
        if criterion != criteria[0]:  # reuse the first run's dense model as start and teacher
            if seconds_left(args) < 30 or not (first / "01-train" / "model").is_dir():
                rows.append({"criterion": criterion, "skipped": "budget" if seconds_left(args) < 30 else "no dense model"})
                continue
            dense = str((first / "01-train" / "model").resolve())
            r["model"]["init_from"] = dense
            r["stages"] = [s for s in r["stages"] if s["type"] != "train"]
            for s in r["stages"]:
                if s["type"] == "finetune":
                    s["distill"]["teacher"] = dense
                if s["type"] == "bench":
                    s.pop("baseline", None)
        for s in r["stages"]:
            if s["type"] == "prune":
                s["criterion"] = criterion
        run_dir = Path(args.runs) / f"prune-{args.stamp}-{criterion}"
        code, wall = run_recipe(r, run_dir, args)
        row: dict[str, Any] = {"criterion": criterion, "exit_code": code, "wall_s": wall, "epochs_factor": factor}
        s = summaries(run_dir)
        if "train" in s:
            row.update(dense_top1=s["train"].get("top1"), dense_train_s=s["train"].get("train_time_s"))
        if "prune" in s:
            row.update(macs_fraction=s["prune"].get("macs_fraction"), params_fraction=s["prune"].get("params_fraction"))
        if "finetune" in s:
            row.update(pruned_top1=s["finetune"].get("top1"), finetune_s=s["finetune"].get("train_time_s"))
        if "bench" in s:
            row.update(pruned_img_s=s["bench"]["results"][0]["img_per_s"],
                       speedup=s["bench"].get("speedup_vs_baseline", {}).get("torch"))
        rows.append(row)
        print(f"  prune_distill {criterion}: {row}", flush=True)
    return rows


def prune_distill_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| criterion | epochs (of the recipe's) | dense top-1 | pruned top-1 | MACs | bf16 img/s pruned | "
             "speedup vs dense |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['criterion']} | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(f"| {r['criterion']} | {r.get('epochs_factor', 1.0):.0%} | {fmt(r.get('dense_top1'), '.2f')} | "
                     f"{fmt(r.get('pruned_top1'), '.2f', 'failed')} | {fmt(r.get('macs_fraction'), '.2f')} | "
                     f"{fmt(r.get('pruned_img_s'), ',.0f')} | {fmt(r.get('speedup'), '.2f')} |")
    return lines
