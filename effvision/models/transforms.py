"""Registry of model transforms a model spec lists (token merging, exit heads, ...): each is a
function ``(model, params) -> None`` that changes the model in place, re-applied by
``create_model`` so transformed models persist as spec + safetensors, without pickle."""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch.nn as nn

from ..errors import EffVisionError

__all__ = ["register_transform", "apply_transforms", "TRANSFORMS"]

Transform = Callable[[nn.Module, dict[str, Any]], None]
TRANSFORMS: dict[str, Transform] = {}
_PROVIDERS = ("effvision.dynamic", "effvision.attention")  # modules that register transforms on import


def register_transform(name: str) -> Callable[[Transform], Transform]:
    def deco(fn: Transform) -> Transform:
        TRANSFORMS[name] = fn
        return fn
    return deco


def apply_transforms(model: nn.Module, transforms: list[dict[str, Any]]) -> None:
    for mod in _PROVIDERS:
        importlib.import_module(mod)
    for entry in transforms:
        params = dict(entry)
        name = params.pop("name", None)
        if name not in TRANSFORMS:
            raise EffVisionError(f"model spec lists unknown transform {name!r} (known: {', '.join(sorted(TRANSFORMS))})")
        try:
            TRANSFORMS[name](model, params)
        except TypeError as e:
            raise EffVisionError(f"model spec transform {name!r} has bad parameters: {e}") from None
