"""Optimizer factory registry: recipes name an optimizer; later features (GaLore, per-layer
updates) register their own factories under new names."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2, list_optimizers

from ..errors import ConfigError

__all__ = ["OptimizerConfig", "register_optimizer", "create_optimizer", "OPTIMIZERS"]


@dataclass
class OptimizerConfig:
    """The optimizer of a training stage: any timm optimizer or a registered one (GaLore), with its
    learning rate, weight decay and optimizer-specific settings."""

    name: str = "adamw"             # any timm optimizer (adamw, sgd, lamb, ...) or a registered one
    lr: float = 1e-3                # peak learning rate
    weight_decay: float = 0.05      # decoupled; timm skips norms and biases
    momentum: float = 0.9           # SGD-style optimizers only
    betas: list[float] | None = None
    eps: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # optimizer-specific extras
    # GaLore (galore_adamw, galore_adamw8bit, galore_adafactor; effvision.optim) only:
    rank: int | None = None         # projection rank r (required for galore_*); <= min(m, n) of each target
    update_proj_gap: int = 200      # T: steps between SVD refreshes of the projector
    scale: float = 0.25             # multiplies the projected-back update
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = "std"
    svd: Literal["exact", "randomized"] = "exact"  # randomized: seeded Halko sketch, much cheaper refreshes
    targets: list[str] | None = None  # regexes on parameter names; default: ViT attn.qkv/proj, mlp.fc1/fc2
    layerwise: bool = False         # step each parameter in backward: a full set of gradients never exists

    def validate(self, where: str) -> None:
        _load_registered()
        if self.name not in OPTIMIZERS and self.name not in list_optimizers():
            import difflib
            close = difflib.get_close_matches(self.name, list(OPTIMIZERS) + list_optimizers(), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}.name: unknown optimizer '{self.name}'{hint}")
        if not 0 < self.lr < float("inf"):  # also rejects nan
            raise ConfigError(f"{where}.lr must be a positive finite number, got {self.lr}")
        if not 0 <= self.weight_decay < float("inf"):
            raise ConfigError(f"{where}.weight_decay must be a non-negative finite number, got {self.weight_decay}")
        self._validate_galore(where)

    def _validate_galore(self, where: str) -> None:
        defaults = OptimizerConfig()
        if not self.name.startswith("galore_"):
            for key in _GALORE_KEYS:
                if getattr(self, key) != getattr(defaults, key):
                    raise ConfigError(f"{where}.{key} applies to the galore_* optimizers only, not '{self.name}'")
            return
        if self.rank is None or self.rank <= 0:
            raise ConfigError(f"{where}.rank must be a positive integer for {self.name}, got {self.rank}")
        if self.update_proj_gap <= 0:
            raise ConfigError(f"{where}.update_proj_gap must be positive, got {self.update_proj_gap}")
        if not 0 < self.scale < float("inf"):
            raise ConfigError(f"{where}.scale must be a positive finite number, got {self.scale}")
        if self.targets is not None and not self.targets:
            raise ConfigError(f"{where}.targets is empty; leave it out for the ViT default")


_GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "svd", "targets", "layerwise")


OptimizerFactory = Callable[[nn.Module, OptimizerConfig], torch.optim.Optimizer]
OPTIMIZERS: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    def wrap(fn: OptimizerFactory) -> OptimizerFactory:
        OPTIMIZERS[name] = fn
        return fn
    return wrap


def _load_registered() -> None:
    """The optimizers techniques register (effvision.optim's galore_*) are in OPTIMIZERS after this."""
    from .. import plugins

    plugins.load_plugins()


def create_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    _load_registered()
    if cfg.name in OPTIMIZERS:
        return OPTIMIZERS[cfg.name](model, cfg)
    extra: dict[str, Any] = dict(cfg.kwargs)
    if cfg.betas is not None:
        extra["betas"] = tuple(cfg.betas)
    if cfg.eps is not None:
        extra["eps"] = cfg.eps
    return create_optimizer_v2(model, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum, **extra)
