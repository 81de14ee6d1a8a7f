"""gpu_bench section "galore": the issue's figures against baselines.md's GaLore rows.

1. vit_base_patch16_224, batch 64, bf16 autocast: torch AdamW vs effvision GaLore (rank 128,
   T 200, scale 0.25) in its variants: ms/step over T steps (one projector refresh in the
   window, so the SVD cost is amortized as in training), optimizer state, peak memory.
   Targets: state <= 20% of AdamW's, step time <= 1.15x AdamW's.
2. Batch 8, where weights, gradients and states dominate: peak memory of AdamW vs per-layer
   GaLore (peak over the whole run, first SVD included). Target: at least 30% below AdamW.
   Its ms/step (20 steps, no refresh in the window) is not the step-time figure.
3. CIFAR-10: recipes/cifar10_vit_tiny.yaml (AdamW) vs recipes/cifar10_vit_galore.yaml (per-layer
   GaLore), and GaLore with a global step + grad_clip 1.0 as the reference. Target: within
   1 point of AdamW at the same epochs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..engine.optim import OptimizerConfig
from .bench import bench_optimizer

__all__ = ["galore_section", "galore_markdown"]

T = 200


def _variants() -> list[tuple[str, OptimizerConfig]]:
    g = dict(lr=1e-3, rank=128, update_proj_gap=T, scale=0.25)
    return [("AdamW (torch)", OptimizerConfig(name="adamw", lr=1e-3)),
            ("AdamW fused (torch)", OptimizerConfig(name="adamw", lr=1e-3, kwargs={"fused": True})),
            ("galore_adamw", OptimizerConfig(name="galore_adamw", **g)),
            ("galore_adamw randomized SVD", OptimizerConfig(name="galore_adamw", svd="randomized", **g)),
            ("galore_adamw8bit", OptimizerConfig(name="galore_adamw8bit", **g)),
            ("galore_adamw layerwise", OptimizerConfig(name="galore_adamw", layerwise=True, **g)),
            ("galore_adamw8bit layerwise", OptimizerConfig(name="galore_adamw8bit", layerwise=True, **g))]


def galore_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    dev = torch.device("cuda")
    rows: list[dict[str, Any]] = []
    for batch, steps in ((64, T), (8, 20)):
        for label, cfg in _variants():
            if batch == 8 and "randomized" in label:
                continue
            r = bench_optimizer("vit_base_patch16_224", cfg, batch=batch, steps=steps, warmup=10, device=dev)
            r.update(part="step", variant=label)
            rows.append(r)
            print(f"  galore b{batch} {label:30s} {r['ms_per_step']:7.1f} ms/step  state {r['state_mb']:7.1f} MB  "
                  f"peak {r.get('peak_gb', 0):.2f} GB", flush=True)
    rows += _cifar(args)
    return rows


def _cifar(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = [("AdamW (reference recipe)", "recipes/cifar10_vit_tiny.yaml", []),
            ("GaLore layerwise", "recipes/cifar10_vit_galore.yaml", []),
            ("GaLore global step + grad_clip", "recipes/cifar10_vit_galore.yaml",
             ["stages.train.optimizer.layerwise=false", "stages.train.grad_clip=1.0"])]
    rows = []
    for i, (label, recipe, sets) in enumerate(runs):
        run_dir = Path(args.runs) / f"galore-{args.stamp}-{i}"
        cmd = [sys.executable, "-m", "effvision", "run", recipe, "--out", str(run_dir), "--set", f"data.root={args.data}"]
        for s in sets:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd)
        summary = run_dir / "01-train" / "summary.json"
        row: dict[str, Any] = {"part": "cifar10", "variant": label, "wall_s": time.perf_counter() - t0,
                               "exit_code": proc.returncode}
        if summary.is_file():
            s = json.loads(summary.read_text())
            row.update(top1=s.get("top1"), epochs=s.get("epochs"), train_time_s=s.get("train_time_s"))
        rows.append(row)
        print(f"  galore cifar10 {label}: {row.get('top1')}% (exit {proc.returncode})", flush=True)
    return rows


def galore_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## GaLore (vit_base_patch16_224, bf16 autocast; rank 128, T 200, scale 0.25)\n",
             "| batch | optimizer | ms/step | vs AdamW | state MB (moments + projectors) | vs AdamW | peak GB |",
             "|---|---|---|---|---|---|---|"]
    steps = [r for r in rows if r.get("part") == "step"]
    for r in steps:
        base = next((b for b in steps if b["batch"] == r["batch"] and b["variant"] == "AdamW (torch)"), r)
        peak = (f"{r['peak_gb']:.2f} ({r['peak_gb'] / base['peak_gb'] - 1:+.0%})"
                if "peak_gb" in r and "peak_gb" in base else "n/a")
        lines.append(f"| {r['batch']} | {r['variant']} | {r['ms_per_step']:.1f} | {r['ms_per_step'] / base['ms_per_step']:.2f}x"
                     f" | {r['state_mb']:.1f} ({r['moments_mb']:.1f} + {r['projectors_mb']:.1f}) | "
                     f"{r['state_mb'] / base['state_mb']:.0%} | {peak} |")
    cifar = [r for r in rows if r.get("part") == "cifar10"]
    if cifar:
        lines += ["", "| CIFAR-10 run | epochs | train time (s) | test top-1 |", "|---|---|---|---|"]
        for r in cifar:
            top1 = f"{r['top1']:.2f}%" if r.get("top1") is not None else f"failed (exit {r['exit_code']})"
            t = f"{r['train_time_s']:.1f}" if r.get("train_time_s") is not None else ""
            lines.append(f"| {r['variant']} | {r.get('epochs', '')} | {t} | {top1} |")
    return lines + [""]
