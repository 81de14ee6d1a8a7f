"""The train stage: the recipe's model (or the previous stage's) trained on the recipe's data."""
from __future__ import annotations

import time
from typing import Any

from .. import optim  # noqa: F401  (registers the galore_* optimizers)
from ..assemble.optimizer_state import carry_optimizer_state
from ..engine import Hooks, TrainConfig, Trainer
from ..models.catalog import count_params_macs
from ..models.io import load_model, save_model
from ..tokens import apply_token_drop
from .base import MODEL_DIR, Stage, register_stage
from .common import build_recipe_loaders, build_recipe_model

__all__ = ["TrainStage"]


@register_stage
class TrainStage(Stage):
    type = "train"
    Config = TrainConfig
    distributed = True
    resumable = True
    hooks: Hooks | None = None  # set by features that extend training (distillation, token drop)

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

