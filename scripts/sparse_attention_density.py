"""Accuracy against attention density: a trained model dir (e.g. runs/quickstart/01-train/model),
per-head policies at kept mass 1.0 / 0.99 / 0.95 / 0.9, test top-1 and mean block density of
each; table on stdout, JSON and plot in --out, and the table filed in the results ledger (section
sparse-attention-density) unless --no-ledger.

  .venv/bin/python scripts/sparse_attention_density.py runs/quickstart/01-train/model \
      --recipe recipes/quickstart.yaml --block 16 --out runs/sparse_attention_density
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

from effvision.attention import SparseAttentionConfig, density_report, sparsify_attention_
from effvision.benchmarks.ledger import add_arguments, record
from effvision.engine.evaluate import evaluate
from effvision.models.io import load_model
from effvision.recipe import load_recipe
from effvision.engine.stage import build_recipe_loaders

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--out", default="runs/sparse_attention_density")
    add_arguments(ap)
    a = ap.parse_args()
    cpu = torch.device("cpu")
    loaders = build_recipe_loaders(load_recipe(a.recipe), cpu)
    calib = [x for x, _ in itertools.islice(loaders.train.epoch(0), a.calib_batches)]
    rows = []
    for recovery in (1.0, 0.99, 0.95, 0.9):
        model, _ = load_model(a.model_dir)
        spec = sparsify_attention_(model.eval(), SparseAttentionConfig(recovery=recovery, block=a.block), calib)
        top1 = evaluate(model, loaders.eval, cpu, "off")["top1"]
        rows.append({"recovery": recovery, "density": density_report(spec)["mean_density"], "top1": top1})
        print(f"kept mass {recovery:.2f}: block density {rows[-1]['density']:.3f}  top-1 {top1:.2f}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "density.json").write_text(json.dumps(rows, indent=1))
    plt.plot([r["density"] for r in rows], [r["top1"] for r in rows], "o-")
    for r in rows:
        plt.annotate(f"{r['recovery']}", (r["density"], r["top1"]))
    plt.xlabel("mean attention block density")
    plt.ylabel("test top-1 (%)")
    plt.savefig(out / "accuracy_vs_density.png", dpi=120)
    if not a.no_ledger:
        table = [{"kept mass": r["recovery"], "block": a.block, "block density": r["density"],
                  "test top-1 (%)": r["top1"]} for r in rows]
        raw = {"model_dir": a.model_dir, "block": a.block, "calib_batches": a.calib_batches, "rows": rows}
        command = shlex.join(["python", "scripts/sparse_attention_density.py", *sys.argv[1:]])
        path = record("sparse-attention-density", table, raw, command, "scripts/sparse_attention_density.py",
                      a.ledger_dir)
        print(f"ledger: {path}")


if __name__ == "__main__":
    main()
