"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for models that do not fit one device:
parameters, gradients and optimizer state sharded across the torchrun processes.

The trainer's checkpoints stay the same files as with DDP (full weights in safetensors, full
optimizer state), gathered with torch.distributed.checkpoint's state-dict helpers, so a run
checkpointed under FSDP reloads anywhere, and the final model is a plain timm module again.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

__all__ = ["Sharded", "local_values"]

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets CPU tensors, others {}


def _units(model: nn.Module) -> list[nn.Module]:
    """The sharding units: each transformer block (timm ViTs: ``blocks``) or stage (CNNs:
    ``stages``/``layers``); the root holds the rest (embeddings, head)."""
    for name in ("blocks", "stages", "layers"):
        seq = getattr(model, name, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq):
            return list(seq)
    return []


class Sharded:
    """``model`` sharded in place; ``unsharded()`` gives back a plain module with the trained
    weights (on rank 0)."""

    def __init__(self, model: nn.Module) -> None:
        persistent = set(model.state_dict())
        # A weightless copy to rebuild the plain module at the end, and the buffers a state
        # dict does not carry (non-persistent ones such as rotary tables).
        self._skeleton = copy.deepcopy(model).to("meta")
        self._extra_buffers = {n: b.detach().cpu().clone() for n, b in model.named_buffers() if n not in persistent}
        for unit in _units(model):
            fully_shard(unit)
        fully_shard(model)
        self.model = model

    def model_state(self) -> dict[str, torch.Tensor]:
        """Full weights on rank 0 (collective: every rank calls it)."""
        return get_model_state_dict(self.model, options=_FULL)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, optimizer, options=_FULL)

    def load(self, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None,
             optimizer_state: dict[str, Any] | None = None) -> None:
        """Full state (every rank read the same checkpoint files) into the shards."""
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, weights, options=opts)
        if optimizer is not None and optimizer_state is not None:
            set_optimizer_state_dict(self.model, optimizer, optimizer_state, options=opts)

    def unsharded(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        """A plain module (CPU) holding ``weights`` (``model_state()`` on rank 0)."""
        plain = copy.deepcopy(self._skeleton).to_empty(device="cpu")
        plain.load_state_dict(weights)
        for name, value in self._extra_buffers.items():
            owner, _, attr = name.rpartition(".")
            setattr(plain.get_submodule(owner) if owner else plain, attr, value.clone())
        return plain.train(self.model.training)


def local_values(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly DTensor) parameter."""
    return p.to_local() if hasattr(p, "to_local") else p
