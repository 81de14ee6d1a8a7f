"""deit_small_patch16_224 (random init: speed only) dense vs ToMe in onnxruntime fp32 on the CPU,
both exported through effvision's ONNX export (parity-checked), timed round-robin in one process
so machine load hits both alike; prints img/s medians and the ratio, and files them in the results
ledger (section tome-deit-ort, every round's img/s) unless --no-ledger.

    .venv/bin/python scripts/tome_deit_ort.py [--r 13] [--batch-size 8] [--rounds 5] [--threads 2]
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
import timm
import torch
from tqdm import tqdm

from effvision.bench import time_calls
from effvision.benchmarks.ledger import add_arguments, record
from effvision.dynamic import TokenReduceConfig, reduce_tokens_
from effvision.export import OnnxExportConfig, check_parity, export_onnx


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--r", type=int, nargs="+", default=[13])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    add_arguments(p)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp())
    shape, cfg = (3, 224, 224), OnnxExportConfig(parity_batch_sizes=[1, 2])
    paths, errors = {}, {}
    for r in [0, *args.r]:
        torch.manual_seed(0)
        model = timm.create_model("deit_small_patch16_224").eval()
        if r:
            reduce_tokens_(model, TokenReduceConfig(r=r))
        path = export_onnx(model, work / f"r{r}.onnx", shape, cfg)
        err = check_parity(model, path, shape, cfg.parity_batch_sizes, cfg.atol)["max_abs_error"]
        print(f"r={r}: exported, parity max abs error {err:.2e}")
        paths[r], errors[r] = path, err
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sessions = {r: ort.InferenceSession(str(pth), opts, providers=["CPUExecutionProvider"]) for r, pth in paths.items()}
    x = np.random.default_rng(0).standard_normal((args.batch_size, *shape), dtype=np.float32)
    rates: dict[int, list[float]] = {r: [] for r in sessions}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for r, s in sessions.items():
            name = s.get_inputs()[0].name
            t = time_calls(lambda: s.run(None, {name: x}), warmup=1, iters=args.iters, sync=lambda: None)
            rates[r].append(args.batch_size / statistics.median(t))
    dense = statistics.median(rates[0])
    for r, v in rates.items():
        print(f"r={r}: {statistics.median(v):.1f} img/s (x{statistics.median(v) / dense:.2f} dense)")
    if not args.no_ledger:
        table = [{"ToMe r": r, "batch": args.batch_size, "img/s (median)": statistics.median(v),
                  "spread (min-max) img/s": f"{min(v):,.1f}-{max(v):,.1f}", "vs dense": statistics.median(v) / dense,
                  "parity max abs error": errors[r], "rounds": args.rounds} for r, v in rates.items()]
        raw = {"model": "deit_small_patch16_224", "threads": args.threads, "iters": args.iters,
               "img_per_s_per_round": {f"r={r}": v for r, v in rates.items()}}
        command = shlex.join(["python", "scripts/tome_deit_ort.py", *sys.argv[1:]])
        print(f"ledger: {record('tome-deit-ort', table, raw, command, 'scripts/tome_deit_ort.py', args.ledger_dir)}")


if __name__ == "__main__":
    main()
