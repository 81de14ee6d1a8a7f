"""The grow stage: the newest model grown in depth and/or width (function-preserving), for the
next train stage to continue. A growth schedule is train -> grow -> train -> grow -> train, with
each train stage's epochs the share of the budget (e.g. 30% / 30% / 40%)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..assemble.grow import GrowConfig, check_growth, grow_model, model_shape
from ..models.catalog import count_params_macs
from ..models.io import load_model, save_model
from .base import MODEL_DIR, Stage, register_stage

__all__ = ["GrowStageConfig", "GrowStage"]


@dataclass
class GrowStageConfig(GrowConfig):
    type: str = "grow"


@register_stage
class GrowStage(Stage):
    type = "grow"
    Config = GrowStageConfig

    @classmethod
    def preflight(cls, cfg: GrowStageConfig, recipe: Any, index: int) -> None:
        """A depth below the recipe model's (after earlier grows) fails before any work."""
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
        model, spec = load_model(ctx.previous_model_dir())
        before = model_shape(model)
        grow_cfg = GrowConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(GrowConfig)})
        grown, new_spec = grow_model(model, spec, grow_cfg)
        # the function is unchanged: check it on a random batch before saving anything
        x = torch.randn(2, spec.in_chans, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(0))
        err = (model.eval()(x) - grown.eval()(x)).abs().max().item()
        save_model(grown, new_spec, ctx.stage_dir / MODEL_DIR)
        params_m, gmacs = count_params_macs(grown, (spec.in_chans, spec.img_size, spec.img_size))
        depth, dim, heads = model_shape(grown)
        return {"model": new_spec.name, "kwargs": new_spec.kwargs, "depth": [before[0], depth],
                "embed_dim": [before[1], dim], "num_heads": [before[2], heads], "max_abs_output_change": err,
                "params_m": params_m, "gmacs": gmacs, "wall_time_s": time.perf_counter() - t0}
