"""The eval stage: accuracy of the newest model on the recipe's eval split."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from ..engine.evaluate import evaluate
from ..models.catalog import count_params_macs
from ..models.io import load_model
from ..engine.stage import Stage, register_stage
from ..engine.stage import build_recipe_loaders

__all__ = ["EvalConfig", "EvalStage", "evaluate_model_dir"]


@dataclass
class EvalConfig:
    """The ``eval`` stage: accuracy of the newest model on the recipe's eval split."""

    type: str = "eval"
    tta_flip: bool = False                       # average over the image and its mirror
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"


def evaluate_model_dir(model_dir, recipe, device, tta_flip: bool = False, amp: str = "auto") -> dict[str, Any]:
    model, spec = load_model(model_dir, map_location=device)
    loaders = build_recipe_loaders(recipe, device)
    t0 = time.perf_counter()
    metrics = evaluate(model.to(device), loaders.eval, device, amp, tta_flip)
    params_m, gmacs = count_params_macs(model, (spec.in_chans, spec.img_size, spec.img_size))
    return {**metrics, "model": spec.name, "params_m": params_m, "gmacs": gmacs,
            "model_dir": str(model_dir), "eval_time_s": time.perf_counter() - t0}


@register_stage
class EvalStage(Stage):
    type = "eval"
    Config = EvalConfig

    def run(self) -> dict[str, Any]:
        return evaluate_model_dir(self.ctx.previous_model_dir(), self.ctx.recipe, self.ctx.device,
                                  self.cfg.tta_flip, self.cfg.amp)
