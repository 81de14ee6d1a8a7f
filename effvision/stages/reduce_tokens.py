"""The reduce_tokens stage: ToMe token merging or EViT token pruning on the newest model,
training-free; evaluates before/after and writes the model with the transform in its spec
(a later finetune stage trains the reduced model)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import timm

from ..dynamic.reduce import TokenReduceConfig, reduce_tokens_, token_counts, transform_entry
from ..engine.evaluate import evaluate
from ..models.io import load_model, save_model
from .base import MODEL_DIR, Stage, register_stage
from .common import build_recipe_loaders

__all__ = ["ReduceTokensConfig", "ReduceTokensStage"]


@dataclass
class ReduceTokensConfig(TokenReduceConfig):
    type: str = "reduce_tokens"


@register_stage
class ReduceTokensStage(Stage):
    type = "reduce_tokens"
    Config = ReduceTokensConfig

    @classmethod
    def preflight(cls, cfg: ReduceTokensConfig, recipe: Any, index: int) -> None:
        """Family, CLS token and merge counts, checked on the recipe's (dense) architecture:
        pruning changes widths, never token counts."""
        import effvision.models.small_vit  # noqa: F401  (registration)

        model = timm.create_model(recipe.model.name, num_classes=2, **recipe.model.kwargs)
        token_counts(model, _plain(cfg))

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        ctx = self.ctx
        model, spec = load_model(ctx.previous_model_dir(), map_location=ctx.device)
        loaders = build_recipe_loaders(ctx.recipe, ctx.device)
        before = evaluate(model.to(ctx.device), loaders.eval, ctx.device, "off")
        counts = reduce_tokens_(model, _plain(self.cfg))
        after = evaluate(model, loaders.eval, ctx.device, "off")
        spec.transforms = [*spec.transforms, transform_entry(_plain(self.cfg))]
        save_model(model, spec, ctx.stage_dir / MODEL_DIR)
        return {"top1": after["top1"], "before": before, "after": after, "tokens_per_block": counts,
                "method": self.cfg.method, "model": spec.name, "wall_time_s": time.perf_counter() - t0}


def _plain(cfg: ReduceTokensConfig) -> TokenReduceConfig:
    return TokenReduceConfig(method=cfg.method, r=cfg.r, schedule=cfg.schedule, prop_attn=cfg.prop_attn,
                             keep_rate=cfg.keep_rate, evit_blocks=list(cfg.evit_blocks))
