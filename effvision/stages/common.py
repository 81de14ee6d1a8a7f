"""Helpers shared by stages: device choice, building the recipe's model, its data."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..data import DataInfo, Loaders, build_loaders
from ..errors import EffVisionError
from ..models.io import ModelSpec, create_model, load_model, load_weights

__all__ = ["resolve_device", "build_recipe_model", "build_recipe_loaders", "preflight"]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise EffVisionError("device 'cuda' requested but no CUDA GPU is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def recipe_spec(recipe, info: DataInfo | None = None) -> ModelSpec:
    """The ModelSpec a recipe's model section describes (classes from the data when known)."""
    num_classes = len(info.classes) if info else 10
    return ModelSpec(name=recipe.model.name, kwargs=dict(recipe.model.kwargs), num_classes=num_classes,
                     img_size=recipe.data.img_size, class_names=list(info.classes) if info else [])


def build_recipe_model(recipe, info: DataInfo) -> tuple[nn.Module, ModelSpec]:
    spec = recipe_spec(recipe, info)
    spec.mean, spec.std = tuple(info.mean), tuple(info.std)
    init = recipe.model.init_from
    if init and Path(init).is_dir():
        model, loaded = load_model(init)
        if loaded.num_classes != spec.num_classes:
            raise EffVisionError(f"model.init_from {init} has {loaded.num_classes} classes, the data {spec.num_classes}")
        return model, loaded
    model = create_model(spec, pretrained=recipe.model.pretrained)
    if init:
        if not Path(init).is_file():
            raise EffVisionError(f"model.init_from not found: {init}")
        load_weights(model, init)
    return model, spec


def model_norm(recipe) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std for the data: the recipe's, else the model's pretrained_cfg (no weights built)."""
    if recipe.data.mean and recipe.data.std:
        return tuple(recipe.data.mean), tuple(recipe.data.std)
    import timm

    if not timm.is_model(recipe.model.name):
        create_model(recipe_spec(recipe))  # raises the clear unknown-model error
    cfg = timm.models.get_pretrained_cfg(recipe.model.name)
    mean = getattr(cfg, "mean", None) if cfg else None
    std = getattr(cfg, "std", None) if cfg else None
    return tuple(mean or (0.5, 0.5, 0.5)), tuple(std or (0.5, 0.5, 0.5))


def build_recipe_loaders(recipe, device: torch.device, rank: int = 0, world_size: int = 1,
                         channels_last: bool = False) -> Loaders:
    mean, std = model_norm(recipe)
    return build_loaders(recipe.data, mean=mean, std=std, device=device, seed=recipe.seed, rank=rank,
                         world_size=world_size, channels_last=channels_last)


def preflight(recipe) -> None:
    """Cheap checks of the user's inputs before a run directory is touched."""
    model_norm(recipe)  # raises the clear error for an unknown model name
    data = recipe.data
    if data.name != "digits" and data.root is not None and not Path(data.root).exists() and not data.download:
        raise EffVisionError(f"dataset not found: {data.root} (data.root of '{data.name}')")
    if recipe.model.init_from and not Path(recipe.model.init_from).exists():
        raise EffVisionError(f"model.init_from not found: {recipe.model.init_from}")
    from . import STAGES

    for index, cfg in enumerate(recipe.stages, start=1):  # stages that check their own inputs
        check = getattr(STAGES[cfg.type], "preflight", None)
        if check is not None:
            check(cfg, recipe, index)
