"""Contextual sparsity on a trained model dir, several keep fractions: predictors trained on
training batches, then on the test split top-1 of dense vs oracle vs predicted sparsity (same
heads/neurons kept, so the same block MACs) and the predictors' recall; a table and a plot
(top-1 against block MACs) in --out; the table is filed in the results ledger (section
contextual-sweep) unless --no-ledger.

    .venv/bin/python scripts/contextual_sweep.py RECIPE MODEL_DIR [--keeps 0.67,0.5 0.67,0.3 0.34,0.3]
        [--rank 128] [--steps 1000] [--calib-batches 16] [--out runs/contextual_sweep]
"""
from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
from pathlib import Path

import matplotlib
import torch

from effvision.benchmarks.ledger import add_arguments, record
from effvision.dynamic import ContextualConfig, contextual_sparsity_, set_contextual_mode_
from effvision.dynamic.contextual import contextual_macs
from effvision.dynamic.contextual_train import predictor_recall
from effvision.engine.evaluate import evaluate
from effvision.models.io import load_model
from effvision.recipe import load_recipe
from effvision.engine.stage import build_recipe_loaders

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("recipe")
    p.add_argument("model_dir")
    p.add_argument("--keeps", nargs="+", default=["0.67,0.5", "0.67,0.3", "0.34,0.3", "0.34,0.15"])
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--out", default="runs/contextual_sweep")
    add_arguments(p)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = torch.device("cpu")
    loaders = build_recipe_loaders(load_recipe(args.recipe), cpu)
    calib = [x for x, _ in itertools.islice(loaders.train.epoch(0), args.calib_batches)]
    test = [x for x, _ in loaders.eval.epoch(0)]
    rows, recalls = [], []
    for keeps in args.keeps:
        head_keep, mlp_keep = map(float, keeps.split(","))
        model, _ = load_model(args.model_dir)
        dense = evaluate(model, loaders.eval, cpu, "off")["top1"]
        contextual_sparsity_(model, ContextualConfig(head_keep, mlp_keep, args.rank, args.steps), calib)
        recall = predictor_recall(model, test)
        tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        row = {"head_keep": head_keep, "mlp_keep": mlp_keep, "heads_kept": model.blocks[0].head_k,
               "neurons_kept": model.blocks[0].mlp_k, "dense": dense,
               "macs_fraction": contextual_macs(model, tokens)["fraction"],
               "recall_heads": min(r["heads"] for r in recall), "recall_neurons": min(r["neurons"] for r in recall),
               "recall_neurons_mean": sum(r["neurons"] for r in recall) / len(recall)}
        for mode, key in (("oracle", "oracle"), ("sparse", "predicted")):
            set_contextual_mode_(model, mode)
            row[key] = evaluate(model, loaders.eval, cpu, "off")["top1"]
        rows.append(row)
        recalls.append(recall)
        print(json.dumps(row), flush=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    print("\n| heads kept | MLP neurons kept | block MACs | recall heads / neurons (worst block) | "
          "top-1 dense | oracle | predicted |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['heads_kept']} | {r['neurons_kept']} | {r['macs_fraction']:.0%} | {r['recall_heads']:.3f} / "
              f"{r['recall_neurons']:.3f} | {r['dense']:.2f}% | {r['oracle']:.2f}% | {r['predicted']:.2f}% |")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["macs_fraction"] for r in rows]
    ax.plot(xs, [r["oracle"] for r in rows], "o-", label="oracle top-k")
    ax.plot(xs, [r["predicted"] for r in rows], "s-", label="predicted top-k")
    ax.axhline(rows[0]["dense"], color="gray", ls="--", label="dense")
    ax.set_xlabel("block MACs (fraction of dense, predictors included)")
    ax.set_ylabel("test top-1 (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "contextual_sweep.png", dpi=120)
    print(f"plot: {out / 'contextual_sweep.png'}")
    if not args.no_ledger:
        table = [{"heads kept": r["heads_kept"], "MLP neurons kept": r["neurons_kept"], "block MACs": r["macs_fraction"],
                  "recall heads (worst block)": r["recall_heads"], "recall neurons (worst block)": r["recall_neurons"],
                  "top-1 dense": r["dense"], "top-1 oracle": r["oracle"], "top-1 predicted": r["predicted"]}
                 for r in rows]
        raw = {"model_dir": args.model_dir, "rank": args.rank, "steps": args.steps, "rows": rows,
               "recall_per_block": recalls}
        command = shlex.join(["python", "scripts/contextual_sweep.py", *sys.argv[1:]])
        path = record("contextual-sweep", table, raw, command, "scripts/contextual_sweep.py", args.ledger_dir)
        print(f"ledger: {path}")


if __name__ == "__main__":
    main()
