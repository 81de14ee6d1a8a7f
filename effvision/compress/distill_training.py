"""The ``distill:`` block of a train or finetune stage (a trainer extension): the student is
trained beside a frozen teacher (an earlier stage of this run, a model or run dir, or a timm
name), with the loss terms of ``compress.distill``; ``cache_logits`` runs the teacher once
over the training set and looks its logits up instead."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..errors import ConfigError, EffVisionError
from .distill import Distilled, DistillLoss, DistillSpec
from .logit_cache import CachedTeacher, teacher_logits
from .teacher import TeacherInput, resolve_teacher, teacher_source

__all__ = ["DistillConfig", "setup_distill", "preflight_distill"]


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


def setup_distill(blocks: dict[str, Any], ts: Any) -> None:
    """The trainer steps ``Distilled(student, teacher)`` (the feature projection trains with the
    student) with the distillation loss; the student alone is saved."""
    cfg: DistillConfig = blocks["distill"]
    spec, device = ts.spec, ts.device
    # Before any training: a missing teacher or one with other classes is a user error.
    teacher, t_spec = resolve_teacher(cfg.teacher, ts.run_dir, spec, cfg.teacher_pretrained)
    if cfg.kind == "token" and not hasattr(ts.model, "head_dist"):
        raise EffVisionError(f"distill.kind token: {spec.name} has no distillation token (head_dist); use soft or hard")
    teacher = teacher.to(device)
    adapt: TeacherInput | None = TeacherInput(spec, t_spec).to(device)
    wrapped = Distilled(ts.model, teacher, cfg, (spec.in_chans, spec.img_size, spec.img_size),
                        (t_spec.in_chans, t_spec.img_size, t_spec.img_size))
    teacher_module: nn.Module = teacher
    if cfg.cache_logits:
        _, where = teacher_source(cfg.teacher, ts.run_dir)
        logits, _ = teacher_logits(teacher, where, adapt, ts.loaders.train, device, ts.run_dir / "distill",
                                   ts.dist.is_main)
        teacher_module, adapt = CachedTeacher(logits, ts.loaders.train).to(device), None
    ts.hooks.loss_terms.append(DistillLoss(teacher_module, wrapped, cfg, None if adapt is None or adapt.identity
                                           else adapt))
    ts.train_model = wrapped
    ts.unwrap = lambda m: m.student if isinstance(m, Distilled) else m
    ts.summary["distill"] = cfg.kind


def preflight_distill(blocks: dict[str, Any], recipe: Any, index: int, where: str,
                      skeleton: Callable[[], nn.Module | None]) -> None:
    """The teacher must exist, or be made by an earlier stage of this recipe."""
    ref = blocks["distill"].teacher
    m = re.match(r"^(\d\d)-([a-z_]+)$", ref)
    if m:
        pos, kind = int(m.group(1)), m.group(2)
        types = [s.type for s in recipe.stages]
        if pos < 1 or pos > len(types) or types[pos - 1] != kind or pos >= index:
            raise EffVisionError(f"distill.teacher '{ref}' is not an earlier stage of this recipe "
                                 f"(stages: {', '.join(f'{i:02d}-{t}' for i, t in enumerate(types, 1))})")
        return
    teacher_source(ref, None)
