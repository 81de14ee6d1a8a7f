"""The finetune stage: train the newest model (typically pruned) further, optionally
distilled from a teacher (an earlier stage, a model or run directory, or a timm model).
Without an earlier model it trains the recipe's model from scratch, distilled."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from ..compress.distill import Distilled, DistillLoss, DistillSpec
from ..compress.logit_cache import CachedTeacher, teacher_logits
from ..compress.teacher import TeacherInput, resolve_teacher, teacher_source
from ..data.curriculum import apply_curriculum
from ..dynamic.keep_schedule import apply_keep_schedule
from ..engine import Hooks, TrainConfig, Trainer
from ..errors import ConfigError, EffVisionError
from ..models.catalog import count_params_macs
from ..models.io import load_model, save_model
from ..tokens import apply_token_drop
from .base import MODEL_DIR, Stage, register_stage
from .common import build_recipe_loaders, build_recipe_model
from .train import preflight_training

__all__ = ["DistillConfig", "FinetuneConfig", "FinetuneStage"]


@dataclass
class DistillConfig(DistillSpec):
    teacher: str = ""                    # "01-train" (a stage of this run), a model/run dir, or a timm name
    teacher_pretrained: bool = False     # timm names only: load timm's pretrained weights
    cache_logits: bool = False           # run the teacher once over the training set, then look logits up

    def validate(self, where: str) -> None:
        super().validate(where)
        if not self.teacher:
            raise ConfigError(f"{where}.teacher: name the teacher (e.g. '01-train', a model dir, a timm model)")
        if self.cache_logits and (self.feature_weight > 0 or self.kind == "token"):
            raise ConfigError(f"{where}.cache_logits: cached logits serve soft and hard distillation only "
                              f"(not feature_weight or kind token, which need the teacher's forward)")


@dataclass
class FinetuneConfig(TrainConfig):
    type: str = "finetune"
    distill: DistillConfig | None = None


@register_stage
class FinetuneStage(Stage):
    type = "finetune"
    Config = FinetuneConfig
    # The trainer checkpoints the Distilled module (student + feature projection); the teacher is
    # frozen and reloaded, so --resume continues mid-stage exactly like train.
    resumable = True

    @classmethod
    def preflight(cls, cfg: FinetuneConfig, recipe: Any, index: int) -> None:
        """The teacher must exist (or be made by an earlier stage of this recipe); the training blocks."""
        preflight_training(cfg, recipe, index)
        if cfg.distill is None:
            return
        ref = cfg.distill.teacher
        m = re.match(r"^(\d\d)-([a-z_]+)$", ref)
        if m:
            pos, kind = int(m.group(1)), m.group(2)
            types = [s.type for s in recipe.stages]
            if pos < 1 or pos > len(types) or types[pos - 1] != kind or pos >= index:
                raise EffVisionError(f"distill.teacher '{ref}' is not an earlier stage of this recipe "
                                     f"(stages: {', '.join(f'{i:02d}-{t}' for i, t in enumerate(types, 1))})")
            return
        teacher_source(ref, None)

    def run(self) -> dict[str, Any]:
        ctx, cfg, recipe = self.ctx, self.cfg, self.ctx.recipe
        t0 = time.perf_counter()
        loaders = build_recipe_loaders(recipe, ctx.device, ctx.dist.rank, ctx.dist.world_size, cfg.channels_last)
        prior = ctx.previous_model_dir(required=False)
        # No earlier model: train the recipe's model from scratch (a student distilled from the start).
        model, spec = load_model(prior) if prior is not None else build_recipe_model(recipe, loaders.info)
        hooks, train_model = Hooks(), model
        if cfg.distill is not None:
            # Before any training: a missing teacher or one with other classes is a user error.
            teacher, t_spec = resolve_teacher(cfg.distill.teacher, ctx.run_dir, spec, cfg.distill.teacher_pretrained)
            if cfg.distill.kind == "token" and not hasattr(model, "head_dist"):
                raise EffVisionError(f"distill.kind token: {spec.name} has no distillation token (head_dist); "
                                     f"use soft or hard")
            teacher = teacher.to(ctx.device)
            adapt = TeacherInput(spec, t_spec).to(ctx.device)
            train_model = Distilled(model, teacher, cfg.distill, (spec.in_chans, spec.img_size, spec.img_size),
                                    (t_spec.in_chans, t_spec.img_size, t_spec.img_size))
            if cfg.distill.cache_logits:
                _, where = teacher_source(cfg.distill.teacher, ctx.run_dir)
                logits, _ = teacher_logits(teacher, where, adapt, loaders.train, ctx.device,
                                           ctx.run_dir / "distill", ctx.dist.is_main)
                teacher, adapt = CachedTeacher(logits, loaders.train).to(ctx.device), None
            hooks.loss_terms.append(DistillLoss(teacher, train_model, cfg.distill,
                                                None if adapt is None or adapt.identity else adapt))
        params_m, gmacs = count_params_macs(model, (spec.in_chans, spec.img_size, spec.img_size))
        apply_token_drop(model, cfg.token_drop, hooks, seed=recipe.seed, rank=ctx.dist.rank,
                         where=f"stages[{ctx.index - 1}].token_drop")  # the student
        loaders = apply_curriculum(model, loaders, cfg.curriculum, hooks, spec=spec, epochs=cfg.epochs,
                                   seed=recipe.seed, device=ctx.device, run_dir=ctx.run_dir,
                                   dist=ctx.dist, batch_ramp=cfg.batch_ramp,
                                   where=f"stages[{ctx.index - 1}].curriculum")
        apply_keep_schedule(model, cfg.keep_schedule, spec.transforms, hooks, f"stages[{ctx.index - 1}].keep_schedule")
        trainer = Trainer(train_model, cfg, loaders, device=ctx.device, out_dir=ctx.stage_dir,
                          num_classes=spec.num_classes, seed=recipe.seed, dist=ctx.dist,
                          augment=recipe.data.augment, hooks=hooks)
        result = trainer.fit(resume=ctx.resume)
        final = result.model.student if isinstance(result.model, Distilled) else result.model
        if ctx.dist.is_main:
            save_model(final, spec, ctx.stage_dir / MODEL_DIR)
        return {**result.metrics, "model": spec.name, "params_m": params_m, "gmacs": gmacs, "epochs": cfg.epochs,
                "distill": cfg.distill.kind if cfg.distill else None, "wall_time_s": time.perf_counter() - t0}
