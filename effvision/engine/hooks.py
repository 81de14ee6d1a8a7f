"""Extension points of the training loop, for features that plug into it.

- ``loss_terms``: extra losses added to the task loss (distillation, regularisers).
- ``before_step`` / ``after_step``: per-step model hooks (token-drop schedules, pruning
  regularisers, growth).
- ``on_epoch_end``: callbacks with the epoch's metrics.
- ``schedule_clock``: (global_step, total_steps) -> the position in [0, total_steps] the LR
  schedule sees (default: the step itself; random-LTD's layer-token LR replaces it).
- ``budget_position``: set by the Trainer under ``budget_s``: global_step -> the spent budget
  as a position in [0, total_steps]; schedules of features (kept tokens, curriculum pacing)
  follow it instead of the step when it is set.
The optimizer factory is the registry in ``effvision.engine.optim``; what a training technique
adds (its config key and the hooks above) is a trainer extension (``engine.extensions``); model
changes between stages are modes with their stages (``models.modes``, ``engine.stage``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

__all__ = ["Hooks", "LossTerm", "StepHook"]

# (model, x, y, logits) -> named extra loss terms, each a scalar tensor
LossTerm = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
# (model, global_step, total_steps) -> None
StepHook = Callable[[nn.Module, int, int], None]


@dataclass
class Hooks:
    loss_terms: list[LossTerm] = field(default_factory=list)
    before_step: list[StepHook] = field(default_factory=list)
    after_step: list[StepHook] = field(default_factory=list)
    on_epoch_end: list[Callable[[int, dict[str, Any]], None]] = field(default_factory=list)
    schedule_clock: Callable[[int, int], float] | None = None
    budget_position: Callable[[int], float] | None = None
