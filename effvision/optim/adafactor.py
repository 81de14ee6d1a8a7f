"""GaLoreAdafactor: Adafactor (Shazeer & Stern, 2018) on the projected gradient.

Fixed learning rate from the scheduler (no relative step, no parameter scaling: the trainer
owns the schedule), factored second moment (row and column means over the last two dims:
m + r numbers for an m x r projected gradient), update clipping by RMS, optional momentum on the
unscaled update. Decoupled weight decay is applied after the update, as in GaLoreAdamW.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .base import GaLoreOptimizer

__all__ = ["GaLoreAdafactor"]


class GaLoreAdafactor(GaLoreOptimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, eps: float = 1e-30, clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, beta1: float | None = None, weight_decay: float = 0.0,
                 layerwise: bool = False) -> None:
        super().__init__(params, {"lr": lr, "eps": eps, "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                                  "beta1": beta1, "weight_decay": weight_decay}, layerwise)

    def _direction(self, state: dict, grad: torch.Tensor, group: dict[str, Any]) -> tuple[torch.Tensor, float]:
        g = grad.float()
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        sq = g * g + group["eps"]
        if g.ndim >= 2:  # factored over the last two dims (HF/galore-torch semantics)
            if "row" not in state:
                state["row"] = torch.zeros(g.shape[:-1], dtype=torch.float32, device=g.device)
                state["col"] = torch.zeros(g.shape[:-2] + g.shape[-1:], dtype=torch.float32, device=g.device)
            state["row"].lerp_(sq.mean(dim=-1), 1.0 - beta2t)                   # (..., m)
            state["col"].lerp_(sq.mean(dim=-2), 1.0 - beta2t)                   # (..., n)
            r = (state["row"] / state["row"].mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c = state["col"].unsqueeze(-2).rsqrt()
            update = g * r * c
        else:
            if "sq" not in state:
                state["sq"] = torch.zeros_like(g)
            state["sq"].lerp_(sq, 1.0 - beta2t)
            update = state["sq"].rsqrt() * g
        rms = update.norm() / math.sqrt(update.numel())
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0))  # no host sync
        if group["beta1"] is not None:
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(update)
            update = state["exp_avg"].lerp_(update, 1.0 - group["beta1"]).clone()
        return update, group["lr"]
