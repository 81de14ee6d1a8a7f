"""Chosen policies persist as the ``sparse_attention`` mode of the model's record: the config
asked for (block, recovery, backend) and, as metadata, the policies (grid, block, backend,
layers). Restoring re-applies them (the Attention class swap) before the weights load, so a
model dir stays spec + safetensors and loading never unpickles."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..errors import EffVisionError
from ..models.io import ModelSpec
from ..models.modes import find_mode

__all__ = ["MODE", "restore_policies", "legacy_policies", "read_policies"]

MODE = "sparse_attention"


def read_policies(spec: ModelSpec) -> dict[str, Any] | None:
    """The policies in a spec's record, or None."""
    entry = find_mode(spec.modes, MODE)
    return None if entry is None else dict(entry["metadata"])


def restore_policies(model: nn.Module, config: dict[str, Any], metadata: dict[str, Any]) -> None:
    """The ``sparse_attention`` mode's restore."""
    from .module import apply_policies

    missing = [k for k in ("grid", "block", "layers") if k not in metadata]
    if missing:
        raise EffVisionError(f"model spec: sparse attention policies lack {', '.join(missing)}")
    apply_policies(model, metadata)


def legacy_policies(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A model spec's pre-record ``sparse_attention`` transform (version 1) -> (config, metadata)."""
    if params.get("version") != 1:
        raise EffVisionError(f"model spec: sparse attention policies version {params.get('version')} "
                             f"(this effvision reads 1)")
    policies = {k: v for k, v in params.items() if k != "version"}
    return {k: policies[k] for k in ("block", "recovery", "backend") if k in policies}, policies
