"""Training-step benchmark for optimizers: ms/step, optimizer state and peak memory of one
model on synthetic batches. Used by gpu_bench's "galore" section (CUDA) and by the CPU
state-memory figures of docs/galore.md (scripts/galore_memory.py, which files them in the ledger);
``python -m effvision.optim.bench`` prints the same measurement as JSON."""
from __future__ import annotations

import argparse
import gc
import json
import time
from typing import Any

import timm
import torch
import torch.nn as nn

from ..engine.evaluate import autocast
from ..engine.optim import OptimizerConfig, create_optimizer
from . import factory  # noqa: F401  (registers galore_*)
from .factory import optimizer_state_bytes

__all__ = ["bench_optimizer", "state_mb"]


def state_mb(opt: torch.optim.Optimizer) -> dict[str, float]:
    b = optimizer_state_bytes(opt)
    return {"state_mb": (b["moments"] + b["projectors"]) / 2**20, "moments_mb": b["moments"] / 2**20,
            "projectors_mb": b["projectors"] / 2**20}


def bench_optimizer(model_name: str, cfg: OptimizerConfig, *, batch: int, steps: int, warmup: int,
                    device: torch.device, amp: str = "bf16", img_size: int = 224) -> dict[str, Any]:
    """``warmup`` steps, then ``steps`` timed steps (use steps = update_proj_gap so exactly one
    projector refresh falls in the window); peak memory over the whole run."""
    gc.collect()  # a previous per-layer optimizer and its model form a cycle (param hooks -> optimizer)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    model: nn.Module = timm.create_model(model_name, num_classes=1000).to(device)
    opt = create_optimizer(model, cfg)
    layerwise = bool(getattr(opt, "layerwise", False))
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        with autocast(device, amp):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if not layerwise:
            opt.step()
            opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
    ms = (time.perf_counter() - t0) / max(steps, 1) * 1e3
    out = {"model": model_name, "optimizer": cfg.name, "rank": cfg.rank, "layerwise": layerwise, "svd": cfg.svd,
           "batch": batch, "ms_per_step": ms, **state_mb(opt),
           "params_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}
    if cuda:
        out["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="optimizer state memory and step time of one model (CPU or CUDA)")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    rows = []
    for cfg in (OptimizerConfig(name="adamw", lr=1e-3),
                OptimizerConfig(name="galore_adamw", lr=1e-3, rank=args.rank),
                OptimizerConfig(name="galore_adamw8bit", lr=1e-3, rank=args.rank)):
        rows.append(bench_optimizer(args.model, cfg, batch=args.batch, steps=args.steps, warmup=1, device=dev,
                                    amp="off" if dev.type == "cpu" else "bf16"))
        print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
