"""GaLoreAdamW and GaLoreAdamW8bit: Adam on the projected gradient, galore-torch 1.0's
formula (eps added to sqrt(v); bias correction folded into the step size; decoupled weight
decay after the update). The elementwise work runs in kernels.galore_adam (Triton on CUDA,
the PyTorch reference elsewhere)."""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ..kernels import galore_adam as K
from ..kernels.quant8 import num_blocks
from .base import GaLoreOptimizer

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit"]


class GaLoreAdamW(GaLoreOptimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, layerwise: bool = False) -> None:
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0 or eps < 0:
            raise ValueError(f"invalid betas {betas} or eps {eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay},
                         layerwise)

    @staticmethod
    def _step_size(state: dict, group: dict[str, Any]) -> float:
        beta1, beta2 = group["betas"]
        t = state["step"]
        return group["lr"] * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)

    def _moments(self, state: dict, like: torch.Tensor) -> None:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
            state["exp_avg_sq"] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)

    def _direction(self, state: dict, grad: torch.Tensor, group: dict[str, Any]) -> tuple[torch.Tensor, float]:
        self._moments(state, grad)
        beta1, beta2 = group["betas"]
        d = K.adam_direction(grad.contiguous(), state["exp_avg"], state["exp_avg_sq"], beta1, beta2, group["eps"])
        return d, self._step_size(state, group)

    def _dense_update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict[str, Any],
                      decay: float) -> None:
        self._moments(state, p)
        beta1, beta2 = group["betas"]
        if p.is_contiguous() and grad.is_contiguous():  # one fused pass over p, grad, m, v
            K.adam_dense(p, grad, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, group["eps"],
                         self._step_size(state, group), decay)
        else:
            super()._dense_update(p, grad, state, group, decay)


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLoreAdamW with block-wise 8-bit moments (kernels.quant8): about 2 bytes per
    state element instead of 8. Tensors under ``min_8bit_size`` elements (biases, norms)
    keep fp32 moments, as bitsandbytes does: they cost little and quantize poorly."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, layerwise: bool = False,
                 min_8bit_size: int = 4096) -> None:
        self.min_8bit_size = min_8bit_size
        super().__init__(params, lr, betas, eps, weight_decay, layerwise)

    def _moments8(self, state: dict, like: torch.Tensor) -> bool:
        """Create 8-bit moments for ``like``'s shape; False if it stays fp32."""
        if "exp_avg" in state or like.numel() < self.min_8bit_size:
            return False
        if "m_codes" not in state:
            nb, dev = num_blocks(like.numel()), like.device
            state["m_codes"] = torch.zeros(like.shape, dtype=torch.int8, device=dev)
            state["v_codes"] = torch.zeros(like.shape, dtype=torch.uint8, device=dev)
            state["m_absmax"] = torch.zeros(nb, dtype=torch.float32, device=dev)
            state["v_absmax"] = torch.zeros(nb, dtype=torch.float32, device=dev)
        return True

    def _q(self, state: dict) -> tuple[torch.Tensor, ...]:
        return state["m_codes"], state["m_absmax"], state["v_codes"], state["v_absmax"]

    def _direction(self, state: dict, grad: torch.Tensor, group: dict[str, Any]) -> tuple[torch.Tensor, float]:
        if not self._moments8(state, grad):
            return super()._direction(state, grad, group)
        beta1, beta2 = group["betas"]
        d = K.adam_direction_8bit(grad.contiguous(), *self._q(state), beta1, beta2, group["eps"])
        return d, self._step_size(state, group)

    def _dense_update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict[str, Any],
                      decay: float) -> None:
        if not self._moments8(state, p):
            return super()._dense_update(p, grad, state, group, decay)
        beta1, beta2 = group["betas"]
        if p.is_contiguous():
            K.adam_dense_8bit(p, grad.contiguous(), *self._q(state), beta1, beta2, group["eps"],
                              self._step_size(state, group), decay)
        else:
            d = K.adam_direction_8bit(grad.contiguous(), *self._q(state), beta1, beta2, group["eps"])
            p.add_(d.view(p.shape).to(p.dtype), alpha=-self._step_size(state, group)).mul_(decay)
