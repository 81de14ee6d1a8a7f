"""Where a detection backbone comes from: a timm/effvision name, a model directory, a run
directory (its newest stage's model), or a module the caller built.

Model and run directories go through ``effvision.models.io.load_model`` (spec + safetensors),
so whatever an effvision stage wrote (a trained, pruned or otherwise compressed timm model)
loads here with no extra code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch.nn as nn

from ..errors import EffVisionError
from ..models.io import SPEC_FILE, ModelSpec, create_model, load_model
from ..engine.stage import MODEL_DIR, stage_dirs

__all__ = ["check_source", "resolve_model_dir", "load_trunk"]


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory as given, or the newest stage's ``model/`` of a run directory."""
    path = Path(path)
    if (path / SPEC_FILE).is_file():
        return path
    for d in stage_dirs(path):
        if (d / MODEL_DIR / SPEC_FILE).is_file():
            return d / MODEL_DIR
    raise EffVisionError(f"{path} holds no model: neither {SPEC_FILE} nor a run stage with {MODEL_DIR}/{SPEC_FILE}")


def check_source(source: str | Path) -> None:
    """Raise the clear error for a source that is neither a model/run dir nor a model name."""
    import effvision.models.small_vit  # noqa: F401  (effvision's names in timm's registry)

    if Path(source).exists():
        resolve_model_dir(source)
        return
    name = str(source)
    if not timm.is_model(name):
        if "/" in name or name.startswith("."):
            raise EffVisionError(f"backbone not found: {name} (no such directory, and not a timm model name)")
        create_model(ModelSpec(name=name))  # raises the unknown-name error with suggestions


def load_trunk(source: str | Path, kwargs: dict[str, Any] | None = None,
               pretrained: bool = False) -> tuple[nn.Module, ModelSpec]:
    """(model, spec) for a name, model directory or run directory. Names get no classifier."""
    check_source(source)
    if Path(source).exists():
        if kwargs or pretrained:
            raise EffVisionError(f"backbone kwargs/pretrained apply to model names, not to the saved model {source}")
        return load_model(resolve_model_dir(source))
    name = str(source)
    cfg = timm.models.get_pretrained_cfg(name)
    size = (getattr(cfg, "input_size", None) or (3, 224, 224))[-1]
    spec = ModelSpec(name=name, kwargs=dict(kwargs or {}), num_classes=0, img_size=int(size),
                     mean=tuple(getattr(cfg, "mean", None) or (0.485, 0.456, 0.406)),
                     std=tuple(getattr(cfg, "std", None) or (0.229, 0.224, 0.225)))
    return create_model(spec, pretrained=pretrained), spec
