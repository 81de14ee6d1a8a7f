"""Chosen policies persist in the model spec (model.json) as a model transform, like token
reduction: ``{"name": "sparse_attention", "version": 1, "grid", "block", "backend", "layers"}``.
``create_model`` re-applies it (the Attention class swap) before the weights load, so a model
dir stays spec + safetensors and loading never unpickles."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn as nn

from ..errors import EffVisionError
from ..models.io import ModelSpec
from ..models.transforms import register_transform

__all__ = ["TRANSFORM", "with_policies", "read_policies"]

TRANSFORM = "sparse_attention"
_VERSION = 1


def with_policies(spec: ModelSpec, policies: dict[str, Any]) -> ModelSpec:
    """A copy of ``spec`` whose transforms end with these policies (replacing earlier ones)."""
    kept = [t for t in spec.transforms if t.get("name") != TRANSFORM]
    return dataclasses.replace(spec, transforms=[*kept, {"name": TRANSFORM, "version": _VERSION, **policies}])


def read_policies(spec: ModelSpec) -> dict[str, Any] | None:
    for t in spec.transforms:
        if t.get("name") == TRANSFORM:
            return {k: v for k, v in t.items() if k not in ("name", "version")}
    return None


@register_transform(TRANSFORM)
def _transform(model: nn.Module, params: dict[str, Any]) -> None:
    from .module import apply_policies

    if params.get("version") != _VERSION:
        raise EffVisionError(f"model spec: sparse attention policies version {params.get('version')} "
                             f"(this effvision reads {_VERSION})")
    missing = [k for k in ("grid", "block", "layers") if k not in params]
    if missing:
        raise EffVisionError(f"model spec: sparse attention policies lack {', '.join(missing)}")
    apply_policies(model, params)
