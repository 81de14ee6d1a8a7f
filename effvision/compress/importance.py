"""Importance criteria for structured pruning: a registry of Torch-Pruning importances.

Each criterion builds a ``torch_pruning`` importance object and, where it needs data, reads
gradients from calibration batches first:

- ``l1`` / ``l2``: weight magnitude of every coupled tensor in a group (Li et al. 2017).
- ``random``: the baseline every criterion has to beat.
- ``taylor``: first-order Taylor |w * dL/dw| summed over calibration batches (Molchanov 2019).
- ``obd``: Optimal Brain Damage, w^2 * H_ii with the Hessian diagonal approximated by the
  empirical Fisher (mean of per-sample squared gradients), as in Torch-Pruning's
  GroupHessianImportance, whose accumulation we fix (see ``_OBD``). Second-order criteria
  rank ViT heads and MLP units better than magnitude (Kwon et al. 2022; Yu et al. 2022).

Register more with ``register_criterion``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

__all__ = ["Criterion", "CRITERIA", "register_criterion", "get_criterion"]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Criterion:
    name: str
    build: Callable[[], tp.importance.Importance]
    # (model, importance, batches) -> None: leaves what the importance reads (grads) in place
    calibrate: Callable[[nn.Module, tp.importance.Importance, Batches], None] | None = None

    @property
    def needs_data(self) -> bool:
        return self.calibrate is not None


CRITERIA: dict[str, Criterion] = {}


def register_criterion(criterion: Criterion) -> Criterion:
    CRITERIA[criterion.name] = criterion
    return criterion


def get_criterion(name: str) -> Criterion:
    from ..errors import ConfigError

    if name not in CRITERIA:
        raise ConfigError(f"unknown pruning criterion '{name}' (available: {', '.join(CRITERIA)})")
    return CRITERIA[name]


def _logits(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    # DeiT distilled models return (cls, dist) logits in training mode
    return out[0] if isinstance(out, tuple) else out


def _taylor_grads(model: nn.Module, imp: tp.importance.Importance, batches: Batches) -> None:
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        F.cross_entropy(_logits(model(x)), y).backward()  # gradients sum over batches


class _OBD(tp.importance.GroupHessianImportance):
    """Torch-Pruning 1.6.1's accumulate_grad tests ``name in`` a dict keyed by parameter, so it
    keeps only the last sample's squared gradient; this keeps the sum, as OBD intends."""

    def accumulate_grad(self, model: nn.Module) -> None:
        for p in model.parameters():
            if p.grad is not None:
                g2 = p.grad.detach().pow(2)
                self._accu_grad[p] = self._accu_grad[p] + g2 if p in self._accu_grad else g2
                self._counter[p] = self._counter.get(p, 0) + 1


def _obd_grads(model: nn.Module, imp: tp.importance.Importance, batches: Batches) -> None:
    assert isinstance(imp, _OBD)
    imp.zero_grad()
    for x, y in batches:
        losses = F.cross_entropy(_logits(model(x)), y, reduction="none")  # (B,)
        for i, loss in enumerate(losses):  # per-sample gradients: Fisher = E[g^2], not E[g]^2
            model.zero_grad(set_to_none=True)
            loss.backward(retain_graph=i + 1 < len(losses))
            imp.accumulate_grad(model)


register_criterion(Criterion("l1", lambda: tp.importance.GroupMagnitudeImportance(p=1)))
register_criterion(Criterion("l2", lambda: tp.importance.GroupMagnitudeImportance(p=2)))
register_criterion(Criterion("random", tp.importance.RandomImportance))
register_criterion(Criterion("taylor", tp.importance.GroupTaylorImportance, _taylor_grads))
register_criterion(Criterion("obd", _OBD, _obd_grads))
