"""The train stage: the recipe's model (or the previous stage's) trained on the recipe's data."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import optim  # noqa: F401  (registers the galore_* optimizers)
from ..assemble.optimizer_state import carry_optimizer_state
from ..data.curriculum import apply_curriculum, check_curriculum, check_reference
from ..dynamic.keep_schedule import apply_keep_schedule
from ..engine import Hooks, TrainConfig, Trainer
from ..models.catalog import count_params_macs
from ..models.io import SPEC_FILE, ModelSpec, create_model, load_model, save_model
from ..tokens import apply_token_drop
from ..tokens.random_ltd import check_token_drop
from .base import MODEL_DIR, Stage, register_stage
from .common import build_recipe_loaders, build_recipe_model, recipe_spec

__all__ = ["TrainStage", "preflight_training"]

# Stages that keep the model's architecture: after only these, the recipe's model is the one trained.
_SAME_ARCHITECTURE = {"train", "finetune", "eval", "bench", "export"}


def _recipe_model_skeleton(recipe: Any) -> nn.Module:
    """The recipe's model on the meta device: its structure, no memory, no weights."""
    init = recipe.model.init_from
    spec = (ModelSpec.from_json((Path(init) / SPEC_FILE).read_text()) if init and (Path(init) / SPEC_FILE).is_file()
            else recipe_spec(recipe))
    with torch.device("meta"):
        return create_model(spec)


def preflight_training(cfg: TrainConfig, recipe: Any, index: int) -> None:
    """The training blocks' input errors, before a run dir is touched: a missing curriculum
    reference; and, when the recipe's model is the one this stage trains (no earlier stage
    changes the architecture), token_drop's block indices / start_tokens / transformer blocks
    and curriculum's resolution support. Otherwise those are checked when the stage starts."""
    where = f"stages[{index - 1}]"
    if cfg.curriculum is not None and cfg.curriculum.metric == "loss":
        check_reference(cfg.curriculum.reference or "", [s.type for s in recipe.stages], index, f"{where}.curriculum")
    if cfg.token_drop is None and cfg.curriculum is None:
        return
    if any(s.type not in _SAME_ARCHITECTURE for s in recipe.stages[:index - 1]):
        return
    model = _recipe_model_skeleton(recipe)
    if cfg.token_drop is not None:
        check_token_drop(model, cfg.token_drop, f"{where}.token_drop")
    if cfg.curriculum is not None:
        check_curriculum(model, cfg.curriculum, recipe.data.img_size, f"{where}.curriculum")


@register_stage
class TrainStage(Stage):
    type = "train"
    Config = TrainConfig
    distributed = True
    resumable = True
    hooks: Hooks | None = None  # set by features that extend training (distillation, token drop)

    @classmethod
    def preflight(cls, cfg: TrainConfig, recipe: Any, index: int) -> None:
        preflight_training(cfg, recipe, index)

    def run(self) -> dict[str, Any]:
        ctx, cfg, recipe = self.ctx, self.cfg, self.ctx.recipe
        t0 = time.perf_counter()
        loaders = build_recipe_loaders(recipe, ctx.device, ctx.dist.rank, ctx.dist.world_size, cfg.channels_last)
        prior = ctx.previous_model_dir(required=False)
        if prior is not None:
            model, spec = load_model(prior)
        else:
            model, spec = build_recipe_model(recipe, loaders.info)
        params_m, gmacs = count_params_macs(model, (spec.in_chans, spec.img_size, spec.img_size))
        hooks = self.hooks or Hooks()
        apply_token_drop(model, cfg.token_drop, hooks, seed=recipe.seed, rank=ctx.dist.rank,
                         where=f"stages[{ctx.index - 1}].token_drop")
        loaders = apply_curriculum(model, loaders, cfg.curriculum, hooks, spec=spec, epochs=cfg.epochs,
                                   seed=recipe.seed, device=ctx.device, run_dir=ctx.run_dir,
                                   dist=ctx.dist, batch_ramp=cfg.batch_ramp,
                                   where=f"stages[{ctx.index - 1}].curriculum")
        apply_keep_schedule(model, cfg.keep_schedule, spec.transforms, hooks, f"stages[{ctx.index - 1}].keep_schedule")
        trainer = Trainer(model, cfg, loaders, device=ctx.device, out_dir=ctx.stage_dir,
                          num_classes=spec.num_classes, seed=recipe.seed, dist=ctx.dist,
                          augment=recipe.data.augment, hooks=hooks)
        carried = carry_optimizer_state(trainer.optimizer, trainer.model, prior)  # after a grow stage's carry
        result = trainer.fit(resume=ctx.resume)
        if ctx.dist.is_main:
            save_model(result.model, spec, ctx.stage_dir / MODEL_DIR)
        return {**result.metrics, **carried, "model": spec.name, "params_m": params_m, "gmacs": gmacs,
                "epochs": cfg.epochs, "world_size": ctx.dist.world_size, "device": str(ctx.device),
                "wall_time_s": time.perf_counter() - t0}

