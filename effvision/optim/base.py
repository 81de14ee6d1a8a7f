"""The GaLore optimizer skeleton: per-parameter steps (from ``step`` or, in per-layer mode,
from a post-accumulate-grad hook), gradient projection, and the back-projection that
writes update and decoupled weight decay into the weight with one GEMM.

Subclasses supply the inner optimizer on the projected gradient (``_direction``): Adam
with fp32 or 8-bit moments, Adafactor.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # builds without torch.distributed have no sharded parameters either
    DTensor = ()  # type: ignore[assignment,misc]

from ..errors import ConfigError
from .projector import projection_side, project, refresh_projector

__all__ = ["GaLoreOptimizer"]

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def _check_group(group: dict[str, Any]) -> None:
    """Bad GaLore settings, named, before any step."""
    rank = group["rank"]
    if not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"GaLore rank must be a positive integer, got {rank!r}")
    if group["update_proj_gap"] <= 0:
        raise ConfigError(f"GaLore update_proj_gap must be positive, got {group['update_proj_gap']}")
    if group["proj_type"] not in PROJ_TYPES:
        raise ConfigError(f"GaLore proj_type must be one of {', '.join(PROJ_TYPES)}, got {group['proj_type']!r}")
    if group["svd"] not in ("exact", "randomized"):
        raise ConfigError(f"GaLore svd must be 'exact' or 'randomized', got {group['svd']!r}")
    names = group.get("names") or [f"parameter {i}" for i in range(len(group["params"]))]
    for name, p in zip(names, group["params"]):
        if isinstance(p, DTensor):  # FSDP2 shards: the SVD of a shard is not the gradient's
            raise ConfigError(f"GaLore cannot project {name}: it is a sharded DTensor (FSDP); the projector "
                              f"needs the whole gradient matrix")
        if p.ndim < 2:
            raise ConfigError(f"GaLore projects matrices only; {name} has shape {tuple(p.shape)}")
        m, n = p.shape[0], p.numel() // p.shape[0]  # conv (O, I, kh, kw) is treated as O x (I*kh*kw)
        if rank > min(m, n):
            raise ConfigError(f"GaLore rank {rank} exceeds min(m, n) = {min(m, n)} of {name} "
                              f"({m} x {n}); lower the rank or leave that parameter dense")


class GaLoreOptimizer(torch.optim.Optimizer):
    """Param groups with a ``rank`` key are projected; the others are stepped densely.

    GaLore group keys: rank, update_proj_gap (T), scale, proj_type, svd ('exact' |
    'randomized'); optional ``names`` (for error messages).
    ``layerwise=True`` steps each parameter as soon as its gradient is accumulated and
    frees that gradient, so a full set of gradients never exists; ``step()`` then only
    updates parameters whose gradient is still there (normally none) and ``zero_grad`` is
    a no-op. Gradients are not averaged across processes first: refuse it under DDP.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], layerwise: bool = False) -> None:
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group.get("rank") is not None:
                group.setdefault("update_proj_gap", 200)
                group.setdefault("scale", 0.25)
                group.setdefault("proj_type", "std")
                group.setdefault("svd", "exact")
                _check_group(group)
        self.layerwise = layerwise
        self._hooks: list[Any] = []
        if layerwise:
            self._group_index = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
            for p in self._group_index:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._layerwise_hook))

    # ---- stepping ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, group)
        return loss

    def _layerwise_hook(self, p: torch.Tensor) -> None:
        with torch.no_grad():
            self._step_param(p, self.param_groups[self._group_index[p]])
        p.grad = None  # freed now: this is where the peak-memory saving comes from

    def remove_hooks(self) -> None:
        """Detach per-layer mode from the parameters (e.g. before reusing the model)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("GaLore optimizers do not support sparse gradients")
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
        decay = 1.0 - group["lr"] * group["weight_decay"]
        if group.get("rank") is None:
            state["step"] += 1
            self._dense_update(p, p.grad, state, group, decay)
            return
        grad = p.grad.reshape(p.shape[0], -1)  # (m, n); conv weights as O x (I*kh*kw)
        side = projection_side(group["proj_type"], *grad.shape)
        if state["step"] % group["update_proj_gap"] == 0 or "proj" not in state:
            refresh_projector(state, grad, group["rank"], side, group["svd"])
            state["refreshes"] = state.get("refreshes", 0) + 1
        low = project(state, grad, side)                   # (m, r), (r, n) or (r, r)
        state["step"] += 1
        direction, step_size = self._direction(state, low, group)
        # p <- (p - step_size * scale * back(direction)) * (1 - lr * wd), as one GEMM into p:
        self._project_back_into(p, direction, state, side, alpha=-step_size * group["scale"] * decay, beta=decay)

    @staticmethod
    def _project_back_into(p: torch.Tensor, d: torch.Tensor, state: dict, side: str, alpha: float,
                           beta: float) -> None:
        proj = state["proj"].to(p.dtype)
        d = d.to(p.dtype)
        if side == "right":
            a, b = d, proj                                  # (m, r) @ (r, n)
        elif side == "left":
            a, b = proj, d                                  # (m, r) @ (r, n)
        else:
            a, b = proj @ d, state["proj_right"].to(p.dtype)  # (m, r) @ (r, r) -> (m, r); @ (r, n)
        if p.is_contiguous():
            p.view(p.shape[0], -1).addmm_(a, b, beta=beta, alpha=alpha)
        else:  # e.g. channels_last conv weights: no 2-D view of the storage
            p.mul_(beta).add_((a @ b).view(p.shape[0], *p.shape[1:]), alpha=alpha)

    # ---- the inner optimizer ----------------------------------------------------------
    def _direction(self, state: dict, grad: torch.Tensor, group: dict[str, Any]) -> tuple[torch.Tensor, float]:
        """Update the inner state with ``grad``; return (normalised direction, step size)."""
        raise NotImplementedError

    def _dense_update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict[str, Any],
                      decay: float) -> None:
        direction, step_size = self._direction(state, grad, group)
        p.add_(direction.to(p.dtype), alpha=-step_size)
        p.mul_(decay)
