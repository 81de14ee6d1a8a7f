"""gpu_bench section "dynamic": speed of effvision.dynamic on one GPU (random init: speed only).

1. deit_small_patch16_224 in bf16 at batch 256: dense vs ToMe r=13 (target >= 1.6x dense img/s)
   vs EViT keep 0.7, timed round-robin (each round times every variant once; medians).
2. Contextual sparsity (heads 50%, MLP neurons 30%): the gather path vs dense at batch 1 and 8,
   alternating call by call (effvision.dynamic.contextual_bench).
``args.toy``: vit_micro_patch4_32 at 32 px on the CPU, a few calls each (the CPU test).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import timm
import torch

from ..benchmarks.registry import seconds_left
from .contextual import ContextualConfig, contextual_macs
from .contextual_train import contextual_sparsity_
from .contextual_bench import dense_vs_sparse
from .reduce import TokenReduceConfig, reduce_tokens_

__all__ = ["dynamic_section", "dynamic_markdown"]

MODEL, BATCH, IMG = "deit_small_patch16_224", 256, 224
VARIANTS = (None, TokenReduceConfig(r=13), TokenReduceConfig(method="evit", keep_rate=0.7))
TOY_R = 4  # vit_micro has 64 patch tokens: r=13 per block would leave too few over 2 blocks
CONTEXTUAL = ContextualConfig(head_keep=0.5, mlp_keep=0.3, steps=20)


def _label(cfg: TokenReduceConfig | None) -> str:
    return "dense" if cfg is None else f"ToMe r={cfg.r}" if cfg.method == "tome" else f"EViT keep {cfg.keep_rate}"


def _build(name: str, cfg: TokenReduceConfig | None, device: str, toy: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, **({"depth": 2} if toy else {}))
    if cfg is not None:
        reduce_tokens_(model, cfg)
    return model.to(device, torch.bfloat16).eval()


@torch.no_grad()
def _throughput(args: argparse.Namespace, device: str, toy: bool) -> list[dict[str, Any]]:
    name, batch, img = ("vit_micro_patch4_32", 8, 32) if toy else (MODEL, BATCH, IMG)
    rounds, iters = (2, 1) if toy else (5, 10)
    variants = [TokenReduceConfig(r=TOY_R) if toy and c is not None and c.method == "tome" else c for c in VARIANTS]
    models = {_label(cfg): _build(name, cfg, device, toy) for cfg in variants}
    x = torch.randn(batch, 3, img, img, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for m in models.values():  # warm-up (cuDNN/cuBLAS heuristics, allocator)
        for _ in range(1 if toy else 3):
            m(x)
    sync()
    per_round: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        if seconds_left(args) < 5:
            break
        for label, m in models.items():
            t = time.perf_counter()
            for _ in range(iters):
                m(x)
            sync()
            per_round[label].append(batch * iters / (time.perf_counter() - t))
    dense = statistics.median(per_round["dense"])
    return [{"part": "throughput", "model": name, "variant": label, "batch_size": batch, "dtype": "bf16",
             "rounds": len(v), "img_per_s": statistics.median(v), "vs_dense": statistics.median(v) / dense}
            for label, v in per_round.items()]


def _contextual(args: argparse.Namespace, device: str, toy: bool) -> list[dict[str, Any]]:
    name, img = ("vit_micro_patch4_32", 32) if toy else (MODEL, IMG)
    torch.manual_seed(0)
    model = timm.create_model(name, **({"depth": 2} if toy else {})).to(device).eval()
    report = contextual_sparsity_(model, CONTEXTUAL, [torch.randn(8, 3, img, img, device=device)])
    model.to(torch.bfloat16)
    macs = contextual_macs(model, model.patch_embed.num_patches + model.num_prefix_tokens)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for b in (1, 8):
        if seconds_left(args) < 5:
            break
        x = torch.randn(b, 3, img, img, device=device, dtype=torch.bfloat16)
        r = dense_vs_sparse(model, x, iters=3 if toy else 100, warmup=1 if toy else 10, sync=sync)
        rows.append({"part": "contextual", "model": name, "dtype": "bf16", "head_keep": CONTEXTUAL.head_keep,
                     "mlp_keep": CONTEXTUAL.mlp_keep, "macs_fraction": macs["fraction"],
                     "calib_images": report["calib_images"], **r})
    return rows


def dynamic_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    toy = getattr(args, "toy", False)
    device = "cpu" if toy else "cuda"
    rows = _throughput(args, device, toy)
    for r in rows:
        print(f"  dynamic {r['variant']:14s} {r['img_per_s']:9.0f} img/s  {r['vs_dense']:.2f}x dense", flush=True)
    if seconds_left(args) > 10:
        for r in _contextual(args, device, toy):
            rows.append(r)
            print(f"  dynamic contextual batch {r['batch_size']}: dense {r['dense_ms_p50']:.2f} ms, "
                  f"sparse {r['sparse_ms_p50']:.2f} ms ({r['speedup']:.2f}x)", flush=True)
    return rows


def dynamic_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | variant | batch | img/s | vs dense |", "|---|---|---|---|---|"]
    for r in rows:
        if r["part"] == "throughput":
            lines.append(f"| {r['model']} | {r['variant']} | {r['batch_size']} | {r['img_per_s']:,.0f} | "
                         f"{r['vs_dense']:.2f}x |")
    ctx = [r for r in rows if r["part"] == "contextual"]
    if ctx:
        lines += ["", "| model | contextual sparsity (heads, MLP kept) | block MACs | batch | dense ms | sparse ms | "
                      "speedup |", "|---|---|---|---|---|---|---|"]
        for r in ctx:
            lines.append(f"| {r['model']} | {r['head_keep']:.0%}, {r['mlp_keep']:.0%} | {r['macs_fraction']:.0%} | "
                         f"{r['batch_size']} | {r['dense_ms_p50']:.2f} | {r['sparse_ms_p50']:.2f} | "
                         f"{r['speedup']:.2f}x |")
    return lines
