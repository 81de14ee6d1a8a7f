"""Adaptive per-head sparse attention for timm ViTs (FastGen's policies on the 2-D token grid):
profile on calibration images, choose per head the cheapest policy in kernel blocks that keeps
a fraction of the attention mass, swap the Attention modules in place, persist in the model's record (the
``sparse_attention`` mode)."""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..models.modes import add_mode, check_next, record_of
from .backends import CUDA_RULES, attend, pick_backend
from .export import export_summary
from .module import SparseAttention, apply_policies, density_report, model_grid
from .persist import MODE, read_policies
from .policies import Grid
from .profile import SparseAttentionConfig, attention_maps, choose_policies

__all__ = ["SparseAttentionConfig", "SparseAttention", "Grid", "sparsify_attention_", "apply_policies",
           "density_report", "model_grid", "read_policies", "attend", "pick_backend", "CUDA_RULES", "export_summary",
           "MODE", "convert_sparse"]


def sparsify_attention_(model: nn.Module, cfg: SparseAttentionConfig, batches: Iterable[torch.Tensor],
                        device: torch.device | str = "cpu") -> dict[str, Any]:
    """Profile, choose and apply per-head policies in place; returns the policy spec (JSON-able).
    The model's record gains a ``sparse_attention`` entry holding the policies."""
    cfg.validate()  # before any work
    check_next(record_of(model), MODE)
    batches = list(batches)
    if not batches:
        raise ConfigError("sparse attention profiling needs at least one calibration batch")
    # the grid of the calibration images: a detection backbone runs at its own (larger) size
    grid = model_grid(model, tuple(batches[0].shape[-2:]))
    chosen = choose_policies(attention_maps(model, batches, device), grid, cfg)
    spec = {"grid": {"prefix": grid.prefix, "h": grid.h, "w": grid.w}, "block": cfg.block,
            "recovery": cfg.recovery, "backend": cfg.backend, "layers": chosen}
    apply_policies(model, spec)
    add_mode(model, MODE, cfg, spec)
    return spec


def convert_sparse(model: nn.Module, cfg: SparseAttentionConfig, calib: list[torch.Tensor] | None) -> dict[str, Any]:
    """The ``sparse_attention`` mode's verb in the mode signature: profiled on ``calib``."""
    return {"density": density_report(sparsify_attention_(model, cfg, calib or []))}
