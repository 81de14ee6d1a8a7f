"""Classification evaluation: top-1/top-5 accuracy and loss over a loader."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["evaluate", "autocast"]


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The autocast context for an amp setting ('auto': bf16 on CUDA, off on CPU)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "auto", tta_flip: bool = False) -> dict[str, float]:
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    n = 0
    for x, y in loader.epoch(0):
        with autocast(device, amp):
            logits = model(x)
            if tta_flip:
                logits = (logits + model(x.flip(3))) / 2
        logits = logits.float()  # (B, K)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hit = top == y[:, None]
        correct1 += int(hit[:, 0].sum())
        correct5 += int(hit.any(dim=1).sum())
        n += len(y)
    model.train(was_training)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": float(loss_sum) / n, "samples": n}
