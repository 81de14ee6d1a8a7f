"""The train and finetune stages: the newest earlier model (else the recipe's) trained on the
recipe's data. One setup path for both: the stage config is ``TrainConfig`` plus one optional
block per registered trainer extension (token_drop, curriculum, batch_ramp, keep_schedule,
distill, qat, ...), and ``engine.fit`` sets those up and builds the Trainer. finetune is the same
stage under the name recipes use after compression (a pruned student, distilled)."""
from __future__ import annotations

import time
from typing import Any

from ..engine import TrainConfig
from ..engine.extensions import extension_blocks, extensions, train_config_class
from ..engine.fit import fit
from ..engine.stage import Stage, build_recipe_model, recipe_skeleton, register_stage
from ..models.catalog import count_params_macs

__all__ = ["TrainStage", "FinetuneStage", "preflight_training"]

# Stages that keep the model's architecture: after only these, the recipe's model is the one trained.
_SAME_ARCHITECTURE = {"train", "finetune", "eval", "bench", "export"}


def preflight_training(cfg: TrainConfig, recipe: Any, index: int) -> None:
    """Each extension's input errors, before a run dir is touched. Checks against the model's
    architecture (token_drop's blocks, curriculum's resolution) see the recipe's model when no
    earlier stage changes it; otherwise they run when the stage starts."""
    where = f"stages[{index - 1}]"
    same = all(s.type in _SAME_ARCHITECTURE for s in recipe.stages[:index - 1])
    cache: dict[str, Any] = {}

    def skeleton() -> Any:
        if same and "model" not in cache:
            cache["model"] = recipe_skeleton(recipe)
        return cache.get("model")

    for ext in extensions():
        blocks = extension_blocks(cfg, ext)
        if ext.preflight is not None and any(v is not None for v in blocks.values()):
            ext.preflight(blocks, recipe, index, where, skeleton)


class TrainStage(Stage):
    type = "train"
    distributed = True
    resumable = True

    @classmethod
    def config_class(cls) -> type:
        return train_config_class(cls.type)

    @classmethod
    def preflight(cls, cfg: TrainConfig, recipe: Any, index: int) -> None:
        preflight_training(cfg, recipe, index)

    @classmethod
    def modes(cls, cfg: Any) -> list[str]:
        return [m for e in extensions() if any(v is not None for v in extension_blocks(cfg, e).values())
                for m in e.modes]

    def run(self) -> dict[str, Any]:
        ctx, cfg, recipe = self.ctx, self.cfg, self.ctx.recipe
        t0 = time.perf_counter()
        loaders = ctx.loaders(cfg.channels_last, sharded=True)
        prior = ctx.previous_model_dir(required=False)
        # No earlier model: the recipe's (a finetune stage first trains a student from scratch, distilled).
        model, spec = ctx.previous_model() if prior is not None else build_recipe_model(recipe, loaders.info)
        params_m, gmacs = count_params_macs(model, (spec.in_chans, spec.img_size, spec.img_size))
        result = fit(model, cfg, loaders, device=ctx.device, out_dir=ctx.stage_dir, num_classes=spec.num_classes,
                     spec=spec, seed=recipe.seed, dist=ctx.dist, augment=recipe.data.augment, resume=ctx.resume,
                     run_dir=ctx.run_dir, source_dir=prior, where=ctx.where)
        if ctx.dist.is_main:
            ctx.save_model(result.model, spec)
        return {**result.metrics, **result.summary, "model": spec.name, "params_m": params_m, "gmacs": gmacs,
                "epochs": cfg.epochs, "world_size": ctx.dist.world_size, "device": str(ctx.device),
                "wall_time_s": time.perf_counter() - t0}


class FinetuneStage(TrainStage):
    # The trainer checkpoints what it steps (a distilled student with its feature projection); a
    # teacher is frozen and reloaded, so --resume continues mid-stage exactly like train.
    type = "finetune"


register_stage(TrainStage)
register_stage(FinetuneStage)
