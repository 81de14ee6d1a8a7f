"""A CPU check of a recipe's training stability, run before a GPU call is spent on it.

    effvision check recipes/cifar10_vit_tiny.yaml [--set k=v ...] [--steps 20]

It trains the recipe's model for a few steps on a CPU slice of its data under bf16 autocast
(as on the GPU) at the recipe's peak learning rate from the first step (no warm-up: the
worst the schedule reaches) with the recipe's grad_clip, and records per step the loss, the
gradient norm before clipping, the largest |logit| and the largest attention logit
|q.k|/sqrt(d) over all heads (read from each timm Attention's q_norm/k_norm, which run with
or without qk_norm). Attention logits that keep growing saturate softmax and, in bf16, end in
NaN: the ViT-22B failure (Dehghani et al. 2023) and the usual cause of a ViT loss spike at a
high learning rate. Problems (exit 1): a non-finite loss, gradient or logit; attention logits
past ``ATTN_LOGIT_LIMIT`` or grown ``GROWTH_LIMIT`` times over the run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy

__all__ = ["StabilityReport", "probe_stability", "ATTN_LOGIT_LIMIT", "GROWTH_LIMIT"]

ATTN_LOGIT_LIMIT = 50.0  # softmax of a logit gap of 50 is one-hot to fp32 precision (e^-50 ~ 2e-22)
GROWTH_LIMIT = 4.0       # the late steps' max over the early steps' max


@dataclass
class StabilityReport:
    lr: float
    grad_clip: float | None
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    logit_max: list[float] = field(default_factory=list)
    attn_logit_max: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def ends(xs: list[float]) -> str:
            return f"{xs[0]:.3g} -> {xs[-1]:.3g} (max {max(xs):.3g})" if xs else "n/a"

        return {"lr": self.lr, "grad_clip": self.grad_clip, "steps": len(self.loss), "loss": ends(self.loss),
                "grad_norm": ends(self.grad_norm), "logit_max": ends(self.logit_max),
                "attn_logit_max": ends(self.attn_logit_max), "problems": self.problems}


class _AttnLogits:
    """Forward hooks on every Attention's q_norm and k_norm: the largest |q.k|*scale of a step."""

    def __init__(self, model: nn.Module) -> None:
        self.max = 0.0
        self._q: dict[nn.Module, torch.Tensor] = {}
        self.handles = []
        for m in model.modules():
            if hasattr(m, "q_norm") and hasattr(m, "k_norm") and hasattr(m, "scale"):
                self.handles.append(m.q_norm.register_forward_hook(lambda mod, i, o, a=m: self._q.__setitem__(a, o)))
                self.handles.append(m.k_norm.register_forward_hook(lambda mod, i, o, a=m: self._k(a, o)))

    @torch.no_grad()
    def _k(self, attn: nn.Module, k: torch.Tensor) -> None:
        q = self._q.pop(attn)  # (B, H, N, D)
        logits = (q.float() @ k.float().transpose(-2, -1)) * attn.scale  # (B, H, N, N)
        self.max = max(self.max, float(logits.abs().amax()))

    def take(self) -> float:
        out, self.max = self.max, 0.0
        return out


def probe_stability(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] = (), steps: int = 20,
                    batch_size: int = 16, amp: str = "bf16") -> StabilityReport:
    """``amp`` bf16 as on the GPU; a CPU without bf16 instructions runs it ~30x slower than fp32
    (9 s per batch of 16 for convvit_small_32 on this project's AMD EPYC), hence small defaults."""
    from .engine.evaluate import autocast
    from .engine.optim import create_optimizer
    from .engine.stage import build_recipe_loaders, build_recipe_model
    from .recipe import load_recipe

    recipe = load_recipe(recipe_path, [*overrides, "device=cpu", f"data.batch_size={batch_size}",
                                       f"data.limit_train={steps * batch_size}", f"data.limit_eval={batch_size}"])
    cfg = next(s for s in recipe.stages if s.type in ("train", "finetune"))
    torch.manual_seed(recipe.seed)
    dev = torch.device("cpu")
    loaders = build_recipe_loaders(recipe, dev)
    model, _ = build_recipe_model(recipe, loaders.info)
    model.train()
    opt_cfg = cfg.optimizer
    if isinstance(opt_cfg.kwargs, dict) and opt_cfg.kwargs.get("fused"):  # fused AdamW: CUDA-only
        from dataclasses import replace
        opt_cfg = replace(opt_cfg, kwargs={k: v for k, v in opt_cfg.kwargs.items() if k != "fused"})
    optimizer = create_optimizer(model, opt_cfg)
    criterion = LabelSmoothingCrossEntropy(cfg.label_smoothing) if cfg.label_smoothing else nn.CrossEntropyLoss()
    report = StabilityReport(lr=opt_cfg.lr, grad_clip=cfg.grad_clip)
    attn = _AttnLogits(model)
    try:
        for step, (x, y) in enumerate(loaders.train.epoch(0, 0)):
            if step >= steps:
                break
            with autocast(dev, amp):
                logits = model(x)  # (B, K)
                loss = criterion(logits, y)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            report.loss.append(float(loss.detach()))
            report.grad_norm.append(grad_norm)
            report.logit_max.append(float(logits.detach().abs().amax()))
            report.attn_logit_max.append(attn.take())
            if not all(math.isfinite(v[-1]) for v in (report.loss, report.grad_norm, report.logit_max)):
                report.problems.append(f"non-finite loss/gradient/logits at step {step}")
                break
    finally:
        for h in attn.handles:
            h.remove()
    a = report.attn_logit_max
    if a and max(a) > ATTN_LOGIT_LIMIT:
        report.problems.append(f"attention logits reach {max(a):.0f} (> {ATTN_LOGIT_LIMIT:.0f}): softmax saturates")
    k = max(1, len(a) // 4)
    if len(a) >= 8 and max(a[-k:]) > GROWTH_LIMIT * max(max(a[:k]), 1.0):
        report.problems.append(f"attention logits grew {max(a[-k:]) / max(max(a[:k]), 1.0):.1f}x "
                               f"over {len(a)} steps (> {GROWTH_LIMIT:.0f}x)")
    return report
