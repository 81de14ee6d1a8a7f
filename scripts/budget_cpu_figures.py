"""Training on a wall-clock budget on the quickstart recipe, side by side in one invocation:
dense, random-LTD, curriculum (progressive resizing 16 -> 32 px), both, the loss-scored
curriculum (difficulty = loss under the same budget's dense model) and the batch ramp, each
for ``budget_s`` seconds of training; test top-1 and accuracy against training wall-clock
(budget_cpu.png and budget_cpu.json in --out); the table is filed in the results ledger (section
budget-cpu-figures) unless --no-ledger.

    .venv/bin/python scripts/budget_cpu_figures.py --out runs/budget_cpu [--budgets 60] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from effvision.benchmarks.ledger import add_arguments, record

TOKEN_DROP = {"start_tokens": 16, "buckets": 4}                         # all tokens from half the budget on
RESOLUTION = {"metric": "resolution", "start": 0.5, "pacing": "linear"}  # 32 px from half the budget on
RAMP = {"start": 0.25, "buckets": 4}                                     # batch 16 -> 64 over half the budget


def _variants(dense_run: Path) -> list[tuple[str, dict[str, Any]]]:
    loss = {"metric": "loss", "reference": str(dense_run), "start": 0.3, "pacing": "root"}
    return [("dense", {}), ("random-LTD", {"token_drop": TOKEN_DROP}),
            ("curriculum (resolution)", {"curriculum": RESOLUTION}), ("random-LTD+curriculum", {"token_drop": TOKEN_DROP, "curriculum": RESOLUTION}),
            ("curriculum (loss)", {"curriculum": loss}), ("batch ramp", {"batch_ramp": RAMP})]


def _run(out: Path, label: str, recipe: dict[str, Any]) -> dict[str, Any]:
    name = label.replace(" ", "_").replace("(", "").replace(")", "")
    path, run = out / f"{name}.yaml", out / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    subprocess.run([sys.executable, "-m", "effvision", "run", str(path), "--out", str(run)], check=True)
    s = json.loads((run / "01-train" / "summary.json").read_text())
    curve = []
    for line in (run / "01-train" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("eval"):
            curve.append((r["train_time_s"], r["top1"]))  # the training clock at this evaluation
    row = {"variant": label, "budget_s": s["budget_s"], "top1": s["top1"], "steps": s["steps_done"],
           "train_img_per_s": s["train_img_per_s"], "eval_time_s": s["eval_time_s"], "curve": curve, "run": str(run)}
    print(f"{label} {s['budget_s']:g}s: top1 {s['top1']:.2f}%  {s['steps_done']} steps  "
          f"{s['train_img_per_s']:.0f} img/s", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/budget_cpu")
    p.add_argument("--budgets", type=float, nargs="+", default=[60.0])
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    add_arguments(p)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path("recipes/quickstart.yaml").read_text())
    base["stages"] = base["stages"][:1]
    base["threads"] = args.threads or None
    base["stages"][0].update(epochs=200, eval_every=2)  # epochs: an upper bound, the budget stops training
    rows = []
    for budget in args.budgets:
        dense_run = out / f"dense-{budget:g}"
        for label, extra in _variants(dense_run / "01-train" / "model"):
            recipe = copy.deepcopy(base)
            recipe["stages"][0].update(budget_s=budget, **extra)
            rows.append(_run(out, f"{label}-{budget:g}" if label != "dense" else f"dense-{budget:g}", recipe))
            rows[-1]["variant"] = label
    (out / "budget_cpu.json").write_text(json.dumps(rows, indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.budgets), figsize=(6 * len(args.budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], args.budgets):
        for r in (r for r in rows if r["budget_s"] == budget):
            ax.plot(*zip(*r["curve"]), marker="o", label=r["variant"])
        ax.set_title(f"budget {budget:g} s")
        ax.set_xlabel("training wall-clock (s, evaluation excluded)")
        ax.set_ylabel("test top-1 (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "budget_cpu.png")
    print(f"plot: {out / 'budget_cpu.png'}")
    if not args.no_ledger:
        table = [{"variant": r["variant"], "budget (s)": r["budget_s"], "test top-1 (%)": r["top1"], "steps": r["steps"],
                  "training img/s": r["train_img_per_s"]} for r in rows]
        command = shlex.join(["python", "scripts/budget_cpu_figures.py", *sys.argv[1:]])
        path = record("budget-cpu-figures", table, rows, command, "scripts/budget_cpu_figures.py", args.ledger_dir)
        print(f"ledger: {path}")


if __name__ == "__main__":
    main()
