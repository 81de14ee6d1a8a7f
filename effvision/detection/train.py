"""A short training loop for torchvision detectors (their forward returns a dict of losses,
which the classification Trainer does not fit): AdamW/SGD from effvision's optimizer
registry, linear warm-up then cosine decay, gradient clipping, bf16 autocast on CUDA."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from ..engine.evaluate import autocast
from ..engine.optim import OptimizerConfig, create_optimizer
from ..errors import TrainingDiverged
from ..io import append_jsonl

__all__ = ["train_detector"]


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def train_detector(model: nn.Module, loader, *, epochs: int, optimizer: OptimizerConfig, device: torch.device,
                   warmup_steps: int = 0, grad_clip: float | None = None, amp: str = "off",
                   log_every: int = 10, metrics_path: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train in place; returns the per-step losses and throughput."""
    model.to(device).train()
    opt = create_optimizer(model, optimizer)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(min(warmup_steps, total), total))
    losses: list[float] = []
    images, t0 = 0, time.perf_counter()
    bar = tqdm(total=total, unit="step", disable=not progress, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 15.0)
    try:
        for epoch in range(epochs):
            for batch_images, targets in loader:
                batch_images = [im.to(device, non_blocking=True) for im in batch_images]
                targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
                with autocast(device, amp):
                    parts = model(batch_images, targets)  # {loss_classifier: ..., loss_box_reg: ..., ...}
                loss = sum(parts.values())
                value = float(loss.detach())  # one host sync per step: detection steps are long, NaN checks cheap
                if not math.isfinite(value):
                    raise TrainingDiverged(f"detection loss is {value} at step {len(losses)} "
                                           f"(lower the learning rate or set grad_clip)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                opt.step()
                sched.step()
                losses.append(value)
                images += len(batch_images)
                bar.update(1)
                if len(losses) % log_every == 0 or len(losses) == total:
                    bar.set_postfix(epoch=epoch, loss=f"{value:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
                    if metrics_path is not None:
                        append_jsonl(metrics_path, {"epoch": epoch, "step": len(losses), "loss": value,
                                                    **{k: float(v) for k, v in parts.items()},
                                                    "lr": opt.param_groups[0]["lr"]})
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return {"losses": losses, "train_time_s": seconds, "train_img_per_s": images / seconds if seconds else 0.0,
            "steps": len(losses)}
