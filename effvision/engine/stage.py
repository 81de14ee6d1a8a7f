"""What a recipe stage is and what it is given: the ``Stage`` base class, its ``StageContext``
(the run directory, the previous stage's model, the recipe's data), and the registry of stage
types that techniques fill from their ``plugin.py``.

Each stage writes only into its own directory ``run_dir/NN-<type>/`` and marks completion by
writing ``summary.json`` last (the pipeline does); a stage that makes a model writes it to
``model/`` as spec + safetensors, and later stages read the newest earlier one.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..data import DataInfo, Loaders, build_loaders
from ..errors import EffVisionError
from ..models.io import SPEC_FILE, ModelSpec, create_model, load_model, load_weights, read_spec, save_model
from .distributed import DistInfo

__all__ = ["Stage", "StageContext", "register_stage", "stage_types", "stage_dirs", "register_variant", "variant",
           "resolve_device", "recipe_spec", "build_recipe_model", "build_recipe_loaders", "model_norm",
           "recipe_skeleton", "SUMMARY_FILE", "MODEL_DIR"]

SUMMARY_FILE = "summary.json"
MODEL_DIR = "model"
_STAGES: dict[str, type["Stage"]] = {}
# Behaviour one package supplies for a stage type of another, on another kind of model:
# (stage type, variant) -> run(stage) -> summary (detection: sparse_attention on a detector).
_VARIANTS: dict[tuple[str, str], Callable[["Stage"], dict[str, Any]]] = {}
_STAGE_DIR = re.compile(r"^\d\d-[a-z_]+$")  # NN-<type>; not NN-<type>.incomplete-<time>


def stage_dirs(run_dir: Path, before: int | None = None) -> list[Path]:
    """A run's stage directories, newest first (optionally only those before index ``before``)."""
    dirs = [d for d in Path(run_dir).iterdir() if d.is_dir() and _STAGE_DIR.match(d.name)] if Path(run_dir).is_dir() else []
    return sorted((d for d in dirs if before is None or int(d.name[:2]) < before), reverse=True)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise EffVisionError("device 'cuda' requested but no CUDA GPU is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def recipe_spec(recipe: Any, info: DataInfo | None = None) -> ModelSpec:
    """The ModelSpec a recipe's model section describes (classes from the data when known)."""
    num_classes = len(info.classes) if info else 10
    return ModelSpec(name=recipe.model.name, kwargs=dict(recipe.model.kwargs), num_classes=num_classes,
                     img_size=recipe.data.img_size, class_names=list(info.classes) if info else [])


def build_recipe_model(recipe: Any, info: DataInfo) -> tuple[nn.Module, ModelSpec]:
    """The recipe's model: ``model.init_from`` (a model dir, or weights for the named model), else
    a fresh (or timm-pretrained) one."""
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


def recipe_skeleton(recipe: Any) -> nn.Module:
    """The recipe's model on the meta device (its structure, no memory, no weights): ``init_from``'s
    spec when that is a model dir."""
    init = recipe.model.init_from
    spec = read_spec(init) if init and (Path(init) / SPEC_FILE).is_file() else recipe_spec(recipe)
    with torch.device("meta"):
        return create_model(spec)


def model_norm(recipe: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


def build_recipe_loaders(recipe: Any, device: torch.device, rank: int = 0, world_size: int = 1,
                         channels_last: bool = False) -> Loaders:
    mean, std = model_norm(recipe)
    return build_loaders(recipe.data, mean=mean, std=std, device=device, seed=recipe.seed, rank=rank,
                         world_size=world_size, channels_last=channels_last)


@dataclass
class StageContext:
    recipe: Any                 # effvision.recipe.Recipe
    run_dir: Path
    stage_dir: Path
    index: int
    device: torch.device
    dist: DistInfo
    resume: bool = False

    @property
    def where(self) -> str:
        """This stage's position in the recipe, for error messages (``stages[2]``)."""
        return f"stages[{self.index - 1}]"

    def previous_model_dir(self, required: bool = True) -> Path | None:
        """The model directory of the newest earlier stage that produced one."""
        for d in stage_dirs(self.run_dir, before=self.index):
            if (d / MODEL_DIR / SPEC_FILE).is_file():
                return d / MODEL_DIR
        if not required:  # train/finetune/detection build from model.init_from themselves
            return None
        init = self.recipe.model.init_from
        if init and (Path(init) / SPEC_FILE).is_file():  # e.g. a prune stage first, on a saved model
            return Path(init)
        raise EffVisionError(f"stage {self.stage_dir.name} needs a model, but no earlier stage made one "
                             f"(put a 'train' stage, or set model.init_from, before it)")

    def previous_stage_file(self, name: str) -> Path | None:
        """The newest earlier stage's file ``name`` (e.g. the export stage's model.onnx)."""
        for d in stage_dirs(self.run_dir, before=self.index):
            if (d / name).is_file():
                return d / name
        return None

    def previous_model(self, on_device: bool = False) -> tuple[nn.Module, ModelSpec]:
        """(model, spec) of the newest earlier stage's model (on this stage's device if asked)."""
        model, spec = load_model(self.previous_model_dir(), map_location=self.device if on_device else "cpu")
        return (model.to(self.device) if on_device else model), spec

    def loaders(self, channels_last: bool = False, sharded: bool = False) -> Loaders:
        """The recipe's data; ``sharded``: this process's slice under torchrun (training stages)."""
        rank, world = (self.dist.rank, self.dist.world_size) if sharded else (0, 1)
        return build_recipe_loaders(self.recipe, self.device, rank, world, channels_last)

    def save_model(self, model: nn.Module, spec: ModelSpec) -> Path:
        """This stage's model (spec with the model's record + safetensors) in ``model/``."""
        return save_model(model, spec, self.stage_dir / MODEL_DIR)


class Stage:
    type: ClassVar[str]
    Config: ClassVar[type]
    distributed: ClassVar[bool] = False  # runs on every torchrun process (else on rank 0 only)
    resumable: ClassVar[bool] = False    # continues from its own checkpoints on --resume
    new_record: ClassVar[bool] = False   # makes a new model whose record starts empty (assemble)
    mode: ClassVar[str | None] = None    # the mode (models.modes) this stage applies to the model, if one

    def __init__(self, cfg: Any, ctx: StageContext) -> None:
        self.cfg, self.ctx = cfg, ctx

    @classmethod
    def config_class(cls) -> type:
        """The dataclass a recipe's stage entry is parsed into."""
        return cls.Config

    @classmethod
    def preflight(cls, cfg: Any, recipe: Any, index: int) -> None:
        """Check this stage's inputs before a run directory is touched (raise EffVisionError)."""

    @classmethod
    def modes(cls, cfg: Any) -> list[str]:
        """The modes (``models.modes``) this stage applies to the model, in order: preflight checks
        their rules against the modes of the stages before it. ``[mode]`` unless a stage's config
        decides (training stages: their extensions')."""
        return [cls.mode] if cls.mode else []

    def run(self) -> dict[str, Any]:
        """Do the work; return the summary (written to summary.json by the pipeline)."""
        raise NotImplementedError


def register_stage(cls: type[Stage]) -> type[Stage]:
    _STAGES[cls.type] = cls
    return cls


def stage_types() -> dict[str, type[Stage]]:
    """Every registered stage type, the techniques' included."""
    from .. import plugins

    plugins.load_plugins()
    return dict(_STAGES)


def register_variant(stage_type: str, variant_name: str, run: Callable[[Stage], dict[str, Any]]) -> None:
    _VARIANTS[(stage_type, variant_name)] = run


def variant(stage_type: str, variant_name: str) -> Callable[[Stage], dict[str, Any]]:
    from .. import plugins

    plugins.load_plugins()
    if (stage_type, variant_name) not in _VARIANTS:
        raise EffVisionError(f"stage {stage_type} has no {variant_name} variant here (its plugin is not installed)")
    return _VARIANTS[(stage_type, variant_name)]
