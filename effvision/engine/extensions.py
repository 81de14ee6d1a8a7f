"""Trainer extensions: what a training technique adds to a train or finetune stage, registered
from its package's ``plugin.py`` (token_drop, keep_schedule, curriculum and batch_ramp,
distillation, QAT, a grown model's carried optimizer state).

An extension owns one or more config keys of the train/finetune stage (a recipe block each,
parsed into its dataclass) and a ``setup(blocks, ts)`` that runs before the Trainer is built:
it may add hooks and loss terms, wrap the data (``ts.loaders``) or the model being trained
(``ts.train_model``, with ``ts.unwrap`` to get the model back), and report summary values.
``started(blocks, ts, trainer)`` runs once the Trainer exists (optimizer state). The engine
imports no technique: it only runs what is registered here.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..data.build import Loaders
from ..models.io import ModelSpec
from .config import TrainConfig
from .distributed import DistInfo
from .hooks import Hooks

__all__ = ["TrainerExtension", "TrainSetup", "register_extension", "extensions", "train_config_class",
           "extension_blocks"]

# (blocks, recipe, stage index, where, skeleton) -> None; skeleton() is the recipe's model on the meta
# device, or None when an earlier stage changes the architecture (checked when the stage starts then).
Preflight = Callable[[dict[str, Any], Any, int, str, Callable[[], "nn.Module | None"]], None]


@dataclass
class TrainSetup:
    """What extensions see and change before the Trainer is built (one training stage)."""

    model: nn.Module               # the model this stage trains and saves
    spec: ModelSpec | None
    cfg: TrainConfig               # the stage's config (an extension may replace it, e.g. amp off for QAT)
    loaders: Loaders
    hooks: Hooks
    device: torch.device
    seed: int = 0
    dist: DistInfo = field(default_factory=DistInfo)
    run_dir: Path | None = None    # the run directory (teachers and caches named by stage)
    source_dir: Path | None = None  # the model dir the model was loaded from (None: built fresh)
    where: str = "train"           # the stage's position, for error messages
    train_model: nn.Module | None = None  # what the Trainer steps; None: ``model``
    unwrap: Callable[[nn.Module], nn.Module] = lambda m: m  # trained module -> the model to save
    summary: dict[str, Any] = field(default_factory=dict)   # extras for the stage summary

    def stepped(self) -> nn.Module:
        return self.train_model if self.train_model is not None else self.model


@dataclass(frozen=True)
class TrainerExtension:
    name: str
    keys: Mapping[str, type]       # config key -> its dataclass (None in a recipe: off)
    setup: Callable[[dict[str, Any], TrainSetup], None]
    order: int = 50                # setups run in this order (distillation wraps the model first)
    always: bool = False           # set up even when none of its keys is given (carried optimizer state)
    modes: tuple[str, ...] = ()    # modes its setup applies to the model (qat: quantize), for preflight's rules
    started: Callable[[dict[str, Any], TrainSetup, Any], dict[str, Any]] | None = None
    preflight: Preflight | None = None


_EXTENSIONS: dict[str, TrainerExtension] = {}


def register_extension(ext: TrainerExtension) -> TrainerExtension:
    taken = {k: e.name for e in _EXTENSIONS.values() for k in e.keys if e.name != ext.name}
    clash = [k for k in ext.keys if k in taken or k in {f.name for f in dataclasses.fields(TrainConfig)}]
    if clash:
        raise ValueError(f"trainer extension {ext.name}: key {clash[0]!r} is taken")
    _EXTENSIONS[ext.name] = ext
    return ext


def extensions() -> list[TrainerExtension]:
    """Every registered extension, in setup order."""
    from .. import plugins

    plugins.load_plugins()
    return sorted(_EXTENSIONS.values(), key=lambda e: (e.order, e.name))


def extension_blocks(cfg: Any, ext: TrainerExtension) -> dict[str, Any]:
    """The blocks of ``ext`` in a stage config (None for keys the config lacks or leaves out)."""
    return {k: getattr(cfg, k, None) for k in ext.keys}


_CONFIG_CLASSES: dict[str, type] = {}


def train_config_class(stage_type: str) -> type:
    """TrainConfig plus one optional field per registered extension key (a recipe block), with the
    stage's ``type``: the config of a training stage, made once per stage type."""
    if stage_type not in _CONFIG_CLASSES:
        exts = extensions()
        fields = [(k, typing.Optional[tp], dataclasses.field(default=None)) for e in exts for k, tp in e.keys.items()]
        fields.append(("type", str, dataclasses.field(default=stage_type)))

        def validate(self: Any, where: str) -> None:
            TrainConfig.validate(self, where)
            for e in exts:
                for k in e.keys:
                    block = getattr(self, k)
                    if block is not None and hasattr(block, "validate"):
                        block.validate(f"{where}.{k}")

        _CONFIG_CLASSES[stage_type] = dataclasses.make_dataclass(
            f"{stage_type.title().replace('_', '')}Config", fields, bases=(TrainConfig,),
            namespace={"validate": validate, "__module__": __name__})
    return _CONFIG_CLASSES[stage_type]
