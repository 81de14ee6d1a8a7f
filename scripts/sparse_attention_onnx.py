"""Sparse attention in onnxruntime: a small ViT at high resolution (vit_micro_patch4_32 at 128x128:
1,025 tokens, random init: speed only) exported three ways through effvision's ONNX export
(parity-checked against the eager module): dense attention, the per-head policies as masked dense
attention, and the same policies in their export form (block gather: banded windowed attention for
local windows). Timed round-robin in one process so machine load hits all alike; prints img/s
medians and ratios, and files them in the results ledger (section sparse-attention-onnx, every
round's img/s) unless --no-ledger.

    .venv/bin/python scripts/sparse_attention_onnx.py [--policy special+local] [--radius 2] [--block 32]
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

import effvision.models  # noqa: F401  (registers vit_micro_patch4_32)
from effvision.attention import apply_policies, model_grid
from effvision.attention.export import BlockGatherAttention
from effvision.bench import time_calls
from effvision.benchmarks.ledger import add_arguments, record
from effvision.export import OnnxExportConfig, check_parity, export_onnx
from effvision.models.io import ModelSpec, create_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--policy", default="special+local", help="policy kind of every head")
    p.add_argument("--radius", type=int, default=2)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    add_arguments(p)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp())
    shape, cfg = (3, args.img_size, args.img_size), OnnxExportConfig(parity_batch_sizes=[1, 2])
    spec = ModelSpec(name="vit_micro_patch4_32", num_classes=10, img_size=args.img_size,
                     kwargs={"img_size": args.img_size})
    paths, errors, density = {}, {}, 0.0
    for form in ("dense", "masked dense", "block gather"):
        torch.manual_seed(0)
        model = create_model(spec).eval()
        if form != "dense":
            g = model_grid(model)
            heads = [{"policy": {"kind": args.policy, "radius": args.radius, "cols": [0]}, "density": 0, "kept": 1}
                     for _ in range(model.blocks[0].attn.num_heads)]
            apply_policies(model, {"grid": {"prefix": g.prefix, "h": g.h, "w": g.w}, "block": args.block,
                                   "layers": {f"blocks.{i}.attn": heads for i in range(len(model.blocks))}})
            attn = model.blocks[0].attn
            density = attn.block_mask.float().mean().item()
            if form == "masked dense":  # the same policies, every head through the masked-dense form
                for b in model.blocks:
                    b.attn.export_attn = BlockGatherAttention(b.attn.block_mask, g.n, args.block, max_cost=0.0)
        path = export_onnx(model, work / f"{form.replace(' ', '_')}.onnx", shape, cfg)
        err = check_parity(model, path, shape, cfg.parity_batch_sizes, cfg.atol)["max_abs_error"]
        print(f"{form}: exported, parity max abs error {err:.2e}", flush=True)
        paths[form], errors[form] = path, err
    print(f"policy {args.policy} radius {args.radius}, block {args.block}: block density {density:.3f}, "
          f"{model_grid(model).n} tokens")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sessions = {f: ort.InferenceSession(str(pth), opts, providers=["CPUExecutionProvider"]) for f, pth in paths.items()}
    x = np.random.default_rng(0).standard_normal((args.batch_size, *shape), dtype=np.float32)
    rates: dict[str, list[float]] = {f: [] for f in sessions}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for f, s in sessions.items():
            name = s.get_inputs()[0].name
            t = time_calls(lambda: s.run(None, {name: x}), warmup=1, iters=args.iters, sync=lambda: None)
            rates[f].append(args.batch_size / statistics.median(t))
    dense = statistics.median(rates["dense"])
    for f, v in rates.items():
        print(f"{f}: {statistics.median(v):.2f} img/s (x{statistics.median(v) / dense:.2f} dense)")
    if not args.no_ledger:
        table = [{"attention form": f, "batch": args.batch_size, "img/s (median)": statistics.median(v),
                  "spread (min-max) img/s": f"{min(v):,.2f}-{max(v):,.2f}", "vs dense": statistics.median(v) / dense,
                  "parity max abs error": errors[f], "rounds": args.rounds} for f, v in rates.items()]
        raw = {"img_size": args.img_size, "tokens": model_grid(model).n, "policy": args.policy, "radius": args.radius,
               "block": args.block, "block_density": density, "threads": args.threads, "iters": args.iters,
               "img_per_s_per_round": rates}
        command = shlex.join(["python", "scripts/sparse_attention_onnx.py", *sys.argv[1:]])
        path = record("sparse-attention-onnx", table, raw, command, "scripts/sparse_attention_onnx.py", args.ledger_dir)
        print(f"ledger: {path}")


if __name__ == "__main__":
    main()
