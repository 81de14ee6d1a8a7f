"""Pruning criteria side by side: prune one trained model with each criterion at the same
ratios and evaluate it before any fine-tuning (the criterion's own contribution).

    .venv/bin/python scripts/compare_criteria.py runs/quickstart_compress --ratio 0.3

Reads the run's recipe (data) and its 01-train model; writes criteria.json and criteria.png
into the run directory, and files the table in the results ledger (section compare-criteria)
unless --no-ledger.
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import warnings
from itertools import islice
from pathlib import Path

import torch

from effvision.benchmarks.ledger import add_arguments, record
from effvision.compress import PruneSpec, prune_
from effvision.engine.evaluate import evaluate
from effvision.models.io import load_model
from effvision.pipeline import load_run_recipe
from effvision.engine.stage import build_recipe_loaders


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of heads, MLP units and width removed")
    p.add_argument("--criteria", default="random,l1,l2,taylor,obd")
    p.add_argument("--calib-batches", type=int, default=4)
    add_arguments(p)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="Unwrapped parameters")
    run = Path(args.run_dir)
    recipe = load_run_recipe(run)
    dense, _ = load_model(run / "01-train" / "model")
    loaders = build_recipe_loaders(recipe, torch.device("cpu"))
    calib = list(islice(loaders.train.epoch(0), args.calib_batches))
    rows = [{"criterion": "dense", **evaluate(dense, loaders.eval, torch.device("cpu"), "off")}]
    for name in args.criteria.split(","):
        torch.manual_seed(0)
        model = copy.deepcopy(dense)
        spec = PruneSpec(ratios={"heads": args.ratio, "mlp": args.ratio, "width": args.ratio}, criterion=name)
        prune_(model, spec, calib[0][0][:2], calib)
        rows.append({"criterion": name, **evaluate(model, loaders.eval, torch.device("cpu"), "off")})
        print(f"{name:8s} top1 {rows[-1]['top1']:.2f}%", flush=True)
    (run / "criteria.json").write_text(json.dumps({"ratio": args.ratio, "rows": rows}, indent=2))
    if not args.no_ledger:
        table = [{"criterion": r["criterion"], "removed": 0.0 if r["criterion"] == "dense" else args.ratio,
                  "test top-1 (%), no fine-tuning": r["top1"], "test top-5 (%)": r["top5"]} for r in rows]
        command = shlex.join(["python", "scripts/compare_criteria.py", *sys.argv[1:]])
        path = record("compare-criteria", table, {"ratio": args.ratio, "run": str(run), "rows": rows}, command,
                      "scripts/compare_criteria.py", args.ledger_dir)
        print(f"ledger: {path}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([r["criterion"] for r in rows], [r["top1"] for r in rows], color="#4878d0")
    ax.set_ylabel("test top-1 (%), no fine-tuning")
    ax.set_title(f"{recipe.model.name}: {args.ratio:.0%} of heads/MLP/width removed", fontsize=9)
    fig.tight_layout()
    fig.savefig(run / "criteria.png", dpi=100)


if __name__ == "__main__":
    main()
