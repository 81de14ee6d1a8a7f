"""EViT's keep-rate schedule during fine-tuning: the kept fraction of patch tokens starts at 1.0
(no pruning) and follows a cosine down to the model's target over the first ``ramp`` of the
stage's steps, as the EViT paper fine-tunes. A before-step hook of the trainer, a pure function
of the step, so ``--resume`` continues it exactly."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch.nn as nn

from ..errors import ConfigError
from ..models.modes import find_mode, record_of

__all__ = ["KeepScheduleConfig", "keep_rate_at", "apply_keep_schedule"]


@dataclass
class KeepScheduleConfig:
    ramp: float = 0.3   # fraction of the stage's steps over which the keep rate goes from 1.0 to the target

    def validate(self, where: str) -> None:
        if not 0 < self.ramp < 1:
            raise ConfigError(f"{where}.ramp: {self.ramp} is outside (0, 1) (the last steps must train at the target)")


def keep_rate_at(target: float, step: int, total: int, ramp: float) -> float:
    t = min(1.0, step / max(1.0, ramp * total))
    return target + (1.0 - target) * 0.5 * (1.0 + math.cos(math.pi * t))


def apply_keep_schedule(model: nn.Module, cfg: KeepScheduleConfig | None, hooks: Any, where: str) -> None:
    """Add the schedule to ``hooks`` for an EViT model (its record's ``reduce_tokens`` entry names the target)."""
    if cfg is None:
        return
    from .reduce import MODE, TokenReduceConfig, set_keep_rate_

    entry = find_mode(record_of(model), MODE)
    if entry is None or entry["config"].get("method") != "evit":
        raise ConfigError(f"{where}: the model is not EViT-pruned (put a reduce_tokens stage with method: evit "
                          f"before this stage)")
    base = TokenReduceConfig(**entry["config"])

    def hook(_model: nn.Module, step: int, total: int) -> None:
        set_keep_rate_(model, replace(base, keep_rate=keep_rate_at(base.keep_rate, step, total, cfg.ramp)))

    hooks.before_step.append(hook)


def setup_keep_schedule(blocks: dict[str, Any], ts: Any) -> None:
    """Trainer extension (``keep_schedule``): EViT's keep rate ramps from 1.0 to the model's target."""
    apply_keep_schedule(ts.model, blocks["keep_schedule"], ts.hooks, f"{ts.where}.keep_schedule")
