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
from pathlib import Path
from typing import Any

import torch

from ..config import apply_overrides
from ..engine.optim import OptimizerConfig
from ..benchmarks.registry import derive_recipe, run_recipe, seconds_left
from .bench import bench_optimizer

__all__ = ["galore_section", "galore_markdown"]

T = 200


def _variants(rank: int = 128) -> list[tuple[str, OptimizerConfig]]:
    g = dict(lr=1e-3, rank=rank, update_proj_gap=T, scale=0.25)
    if rank < 128:  # toy size (CPU test): one dense, one of each GaLore code path
        return [("AdamW (torch)", OptimizerConfig(name="adamw", lr=1e-3)),
                ("galore_adamw8bit layerwise", OptimizerConfig(name="galore_adamw8bit", layerwise=True, **g))]
    return [("AdamW (torch)", OptimizerConfig(name="adamw", lr=1e-3)),
            ("AdamW fused (torch)", OptimizerConfig(name="adamw", lr=1e-3, kwargs={"fused": True})),
            ("galore_adamw", OptimizerConfig(name="galore_adamw", **g)),
            ("galore_adamw randomized SVD", OptimizerConfig(name="galore_adamw", svd="randomized", **g)),
            ("galore_adamw8bit", OptimizerConfig(name="galore_adamw8bit", **g)),
            ("galore_adamw layerwise", OptimizerConfig(name="galore_adamw", layerwise=True, **g)),
            ("galore_adamw8bit layerwise", OptimizerConfig(name="galore_adamw8bit", layerwise=True, **g))]


def galore_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Optimizer steps first (a few seconds per variant); the CIFAR-10 runs only while time is left."""
    toy = getattr(args, "toy", False)
    dev = torch.device("cpu" if toy else "cuda")
    model, img, amp = ("vit_micro_patch4_32", 32, "off") if toy else ("vit_base_patch16_224", 224, "bf16")
    plan = (((2, 2),) if toy else ((64, T), (8, 20)))
    rows: list[dict[str, Any]] = []
    for batch, steps in plan:
        for label, cfg in _variants(rank=8) if toy else _variants():
            if batch == 8 and "randomized" in label:
                continue
            if seconds_left(args) < 15:
                print(f"  galore b{batch} {label}: skipped (budget)", flush=True)
                continue
            r = bench_optimizer(model, cfg, batch=batch, steps=steps, warmup=1 if toy else 10, device=dev, amp=amp,
                                img_size=img)
            r.update(part="step", variant=label)
            rows.append(r)
            print(f"  galore b{batch} {label:30s} {r['ms_per_step']:7.1f} ms/step  state {r['state_mb']:7.1f} MB  "
                  f"peak {r.get('peak_gb', 0):.2f} GB", flush=True)
    rows += _cifar(args)
    return rows


CIFAR_RUN_S = 200  # one 40-epoch CIFAR-10 run with decode and compile, estimated from the H100 run


def _cifar(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = [("AdamW (reference recipe)", "recipes/cifar10_vit_tiny.yaml", []),
            ("GaLore layerwise", "recipes/cifar10_vit_galore.yaml", []),
            ("GaLore global step + grad_clip", "recipes/cifar10_vit_galore.yaml",
             ["stages.train.optimizer.layerwise=false", "stages.train.grad_clip=1.0"])]
    toy = getattr(args, "toy", False)
    if not toy and seconds_left(args) < len(runs) * CIFAR_RUN_S:  # a partial comparison says nothing
        print(f"  galore cifar10: skipped ({seconds_left(args):.0f} s left, needs ~{len(runs) * CIFAR_RUN_S} s)",
              flush=True)
        return [{"part": "cifar10", "variant": label, "skipped": "budget"} for label, _, _ in runs]
    rows = []
    for i, (label, recipe, sets) in enumerate(runs[1:2] if toy else runs):
        run_dir = Path(args.runs) / f"galore-{args.stamp}-{i}"
        if toy:
            sets = sets + ["stages.train.optimizer.rank=8"]
        code, wall = run_recipe(apply_overrides(derive_recipe(recipe, args, keep=("train",)), sets), run_dir, args)
        summary = run_dir / "01-train" / "summary.json"
        row: dict[str, Any] = {"part": "cifar10", "variant": label, "wall_s": wall, "exit_code": code}
        if summary.is_file():
            s = json.loads(summary.read_text())
            row.update(top1=s.get("top1"), epochs=s.get("epochs"), train_time_s=s.get("train_time_s"))
        rows.append(row)
        print(f"  galore cifar10 {label}: {row.get('top1')}% (exit {code})", flush=True)
    return rows


def galore_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| batch | optimizer | ms/step | vs AdamW | state MB (moments + projectors) | vs AdamW | peak GB |",
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
            top1 = (f"{r['top1']:.2f}%" if r.get("top1") is not None else
                    "skipped (budget)" if "skipped" in r else f"failed (exit {r['exit_code']})")
            t = f"{r['train_time_s']:.1f}" if r.get("train_time_s") is not None else ""
            lines.append(f"| {r['variant']} | {r.get('epochs', '')} | {t} | {top1} |")
    return lines + [""]
