"""The grow stage: the newest model grown in depth and/or width (function-preserving), for the
next train stage to continue. A growth schedule is train -> grow -> train -> grow -> train, with
each train stage's epochs the share of the budget (e.g. 30% / 30% / 40%). With
``optimizer_state: carry`` the previous train stage's optimizer state is grown alongside the
weights and the next train stage starts from it (its LR schedule is its own)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..assemble.grow import GrowConfig, check_growth, grow_model, grow_optimizer_state, model_shape
from ..assemble.optimizer_state import STATE_FILE, checkpoint_optimizer_state, save_optimizer_state
from ..engine import TrainConfig
from ..errors import ConfigError
from ..models.catalog import count_params_macs
from ..models.io import load_model, save_model
from .base import MODEL_DIR, Stage, register_stage

__all__ = ["GrowStageConfig", "GrowStage"]


@dataclass
class GrowStageConfig(GrowConfig):
    type: str = "grow"
    # reset: the next train stage starts a fresh optimizer; carry: it continues the previous
    # train stage's state, mapped onto the grown model (new blocks start fresh)
    optimizer_state: Literal["reset", "carry"] = "reset"


def _check_carry(recipe: Any, index: int) -> None:
    """carry needs train stages on both sides, with one optimizer whose state growth can map."""
    where = f"stages[{index - 1}].optimizer_state"
    before = recipe.stages[index - 2] if index >= 2 else None
    after = recipe.stages[index] if index < len(recipe.stages) else None
    for side, stage in (("before", before), ("after", after)):
        if stage is None or stage.type != "train":
            raise ConfigError(f"{where}: carry needs a train stage right {side} the grow stage "
                              f"(found {stage.type if stage else 'none'})")
    if before.optimizer.name != after.optimizer.name:
        raise ConfigError(f"{where}: carry needs one optimizer on both sides of the grow stage "
                          f"({before.optimizer.name} before, {after.optimizer.name} after)")
    if before.optimizer.name.startswith("galore_"):
        raise ConfigError(f"{where}: carry cannot grow {before.optimizer.name}'s projected state; use reset")


@register_stage
class GrowStage(Stage):
    type = "grow"
    Config = GrowStageConfig

    @classmethod
    def preflight(cls, cfg: GrowStageConfig, recipe: Any, index: int) -> None:
        """A depth below the recipe model's (after earlier grows) fails before any work."""
        if cfg.optimizer_state == "carry":
            _check_carry(recipe, index)
        if recipe.model.init_from:
            return  # the starting depth is only known once that model is loaded (run() checks it)
        from .common import recipe_spec
        from ..models.io import create_model

        with torch.device("meta"):  # shapes only, no memory or init cost
            depth = model_shape(create_model(recipe_spec(recipe)))[0]
        for i, stage in enumerate(recipe.stages[:index], start=1):
            if isinstance(stage, GrowStageConfig):
                depth = check_growth(depth, stage, f"stages[{i - 1}]")

    def run(self) -> dict[str, Any]:
        ctx, cfg = self.ctx, self.cfg
        t0 = time.perf_counter()
        prior = ctx.previous_model_dir()
        model, spec = load_model(prior)
        before = model_shape(model)
        grow_cfg = GrowConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(GrowConfig)})
        state = None
        if cfg.optimizer_state == "carry":  # read before any output: a missing checkpoint fails cleanly
            train_cfg = ctx.recipe.stages[int(prior.parent.name[:2]) - 1]
            assert isinstance(train_cfg, TrainConfig), train_cfg  # preflight: a train stage precedes
            state = grow_optimizer_state(checkpoint_optimizer_state(prior.parent, model, train_cfg.optimizer),
                                         model, grow_cfg)
        grown, new_spec = grow_model(model, spec, grow_cfg)
        # the function is unchanged: check it on a random batch before saving anything
        x = torch.randn(2, spec.in_chans, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(0))
        err = (model.eval()(x) - grown.eval()(x)).abs().max().item()
        save_model(grown, new_spec, ctx.stage_dir / MODEL_DIR)
        if state is not None:
            save_optimizer_state(state, ctx.stage_dir / STATE_FILE)
        params_m, gmacs = count_params_macs(grown, (spec.in_chans, spec.img_size, spec.img_size))
        depth, dim, heads = model_shape(grown)
        return {"model": new_spec.name, "kwargs": new_spec.kwargs, "depth": [before[0], depth],
                "embed_dim": [before[1], dim], "num_heads": [before[2], heads], "max_abs_output_change": err,
                "optimizer_state": cfg.optimizer_state, "optimizer_state_params": len(state or {}),
                "params_m": params_m, "gmacs": gmacs, "wall_time_s": time.perf_counter() - t0}
