"""GaLore's optimizer-state memory against AdamW on one model (CPU by default): the state each
optimizer holds after a training step (moments, and GaLore's projectors), and the step time, filed
in the results ledger (section galore-memory) unless --no-ledger. The state sizes do not depend on
the machine's load; the step times do (one timed step each: a rough figure, not a benchmark).

    .venv/bin/python scripts/galore_memory.py [--model vit_base_patch16_224] [--rank 128] [--batch 2]
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

import torch

from effvision.benchmarks.ledger import add_arguments, record
from effvision.engine.optim import OptimizerConfig
from effvision.optim.bench import bench_optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=1, help="timed steps per optimizer (after one warm-up step)")
    add_arguments(p)
    args = p.parse_args()
    results: list[dict[str, Any]] = []
    for cfg in (OptimizerConfig(name="adamw", lr=1e-3),
                OptimizerConfig(name="galore_adamw", lr=1e-3, rank=args.rank),
                OptimizerConfig(name="galore_adamw8bit", lr=1e-3, rank=args.rank)):
        results.append(bench_optimizer(args.model, cfg, batch=args.batch, steps=args.steps, warmup=1,
                                       device=torch.device("cpu"), amp="off"))
        r = results[-1]
        print(f"{r['optimizer']:18s} state {r['state_mb']:8.1f} MB (moments {r['moments_mb']:.1f} + projectors "
              f"{r['projectors_mb']:.1f}), {r['ms_per_step']:.0f} ms/step", flush=True)
    adamw = results[0]["state_mb"]
    rows = [{"optimizer": r["optimizer"], "moments MB": r["moments_mb"], "projectors MB": r["projectors_mb"],
             "state MB": r["state_mb"], "state vs AdamW": f"{100 * r['state_mb'] / adamw:.1f}%",
             "ms/step (CPU, batch %d)" % args.batch: r["ms_per_step"]} for r in results]
    if not args.no_ledger:
        command = shlex.join(["python", "scripts/galore_memory.py", *sys.argv[1:]])
        raw = {"model": args.model, "rank": args.rank, "batch": args.batch, "steps": args.steps,
               "torch_threads": torch.get_num_threads(), "results": results}
        print(f"ledger: {record('galore-memory', rows, raw, command, 'scripts/galore_memory.py', args.ledger_dir)}")


if __name__ == "__main__":
    main()
