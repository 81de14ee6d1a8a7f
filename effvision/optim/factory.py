"""Recipe names for the GaLore optimizers, in effvision.engine's optimizer registry:
    optimizer: {name: galore_adamw, lr: 1.0e-3, rank: 64, update_proj_gap: 200, scale: 0.25, layerwise: true}
Targets (default: ViT block matrices) are projected; the rest is stepped densely by the
same optimizer, weight decay skipping biases, norms and tokens as timm does."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..engine.optim import OptimizerConfig, register_optimizer
from .adafactor import GaLoreAdafactor
from .adamw import GaLoreAdamW, GaLoreAdamW8bit
from .base import GaLoreOptimizer
from .select import split_params

__all__ = ["galore_param_groups", "build_galore", "optimizer_state_bytes"]


def galore_param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    split = split_params(model, cfg.targets)
    groups: list[dict[str, Any]] = [
        {"params": [p for _, p in split.galore], "names": [n for n, _ in split.galore], "rank": cfg.rank,
         "update_proj_gap": cfg.update_proj_gap, "scale": cfg.scale, "proj_type": cfg.proj_type, "svd": cfg.svd},
        {"params": [p for _, p in split.decay]},
        {"params": [p for _, p in split.no_decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_galore(model: nn.Module, cfg: OptimizerConfig) -> GaLoreOptimizer:
    groups = galore_param_groups(model, cfg)
    common: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "layerwise": cfg.layerwise}
    extra = dict(cfg.kwargs)
    if cfg.name == "galore_adafactor":
        try:
            return GaLoreAdafactor(groups, **common, **extra)
        except TypeError as e:
            raise ConfigError(f"optimizer.kwargs for {cfg.name}: {e}") from e
    if cfg.betas is not None:
        extra["betas"] = tuple(cfg.betas)
    if cfg.eps is not None:
        extra["eps"] = cfg.eps
    cls = GaLoreAdamW8bit if cfg.name == "galore_adamw8bit" else GaLoreAdamW
    try:
        return cls(groups, **common, **extra)
    except TypeError as e:  # an unknown key in optimizer.kwargs
        raise ConfigError(f"optimizer.kwargs for {cfg.name}: {e}") from e


for _name in ("galore_adamw", "galore_adamw8bit", "galore_adafactor"):
    register_optimizer(_name)(build_galore)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes held in optimizer state: moments (and any other state) vs GaLore projectors."""
    out = {"moments": 0, "projectors": 0}
    for state in opt.state.values():
        for key, v in state.items():
            if isinstance(v, torch.Tensor):
                out["projectors" if key.startswith("proj") else "moments"] += v.numel() * v.element_size()
    return out
