"""Dense vs contextual sparsity (the gather path) in torch on the CPU, batch 1 and small batches,
timed side by side in one process (the two alternate call by call; medians). Random init at 224:
speed only (which heads/neurons are chosen does not change the work, only how many). The table is
filed in the results ledger (section contextual-latency) unless --no-ledger.

    .venv/bin/python scripts/contextual_latency.py [--models deit_tiny_patch16_224 deit_small_patch16_224]
        [--head-keep 0.5] [--mlp-keep 0.3] [--batch-sizes 1 8] [--iters 30] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import timm
import torch

from effvision.benchmarks.ledger import add_arguments, record
from effvision.dynamic import ContextualConfig, contextual_sparsity_
from effvision.dynamic.contextual import contextual_macs
from effvision.dynamic.contextual_bench import dense_vs_sparse


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "deit_small_patch16_224"])
    p.add_argument("--head-keep", type=float, default=0.5)
    p.add_argument("--mlp-keep", type=float, nargs="+", default=[0.3])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    add_arguments(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        for mlp_keep in args.mlp_keep:
            torch.manual_seed(0)
            model = timm.create_model(name).eval()
            cfg = ContextualConfig(head_keep=args.head_keep, mlp_keep=mlp_keep, steps=5)
            contextual_sparsity_(model, cfg, [torch.randn(4, 3, 224, 224)])  # predictors: their cost, not their skill
            macs = contextual_macs(model, model.patch_embed.num_patches + model.num_prefix_tokens)
            for b in args.batch_sizes:
                r = dense_vs_sparse(model, torch.randn(b, 3, 224, 224), iters=args.iters)
                rows.append({"model": name, "head_keep": args.head_keep, "mlp_keep": mlp_keep,
                             "macs_fraction": macs["fraction"], **r, "threads": args.threads})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end\n")
    print("| model | heads kept | MLP kept | block MACs | batch | dense ms | sparse ms | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['head_keep']:.0%} | {r['mlp_keep']:.0%} | {r['macs_fraction']:.0%} | "
              f"{r['batch_size']} | {r['dense_ms_p50']:.1f} | {r['sparse_ms_p50']:.1f} | {r['speedup']:.2f}x |")
    if not args.no_ledger:
        # dense_vs_sparse keeps only the medians of its alternating calls: those are the raw numbers here
        table = [{"model": r["model"], "heads kept": r["head_keep"], "MLP kept": r["mlp_keep"],
                  "block MACs": r["macs_fraction"], "batch": r["batch_size"], "dense ms (median)": r["dense_ms_p50"],
                  "sparse ms (median)": r["sparse_ms_p50"], "speedup": r["speedup"], "calls (alternating)": r["iters"]}
                 for r in rows]
        command = shlex.join(["python", "scripts/contextual_latency.py", *sys.argv[1:]])
        path = record("contextual-latency", table, rows, command, "scripts/contextual_latency.py", args.ledger_dir)
        print(f"ledger: {path}")


if __name__ == "__main__":
    main()
