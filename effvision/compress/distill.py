"""Knowledge distillation as trainer loss terms (``Hooks.loss_terms``).

- ``soft``: KL(student/T || teacher/T) * T^2 on logits (Hinton et al. 2015).
- ``hard``: cross-entropy on the teacher's argmax (DeiT's hard distillation).
- ``token``: DeiT's distillation token: the student's ``head_dist`` output learns the
  teacher's hard labels (models without one fall back to the class logits).
- ``feature``: MSE between a learned linear projection of the student's pre-logit features
  and the teacher's (the input of each model's classifier, so any timm model works).

The teacher runs in eval mode under no_grad, inside the trainer's autocast (bf16 on GPU), on
its own input: the student's batch resized and re-normalized to the teacher's spec
(``effvision.compress.teacher.TeacherInput``), so a teacher trained at another size or
normalization sees what it was trained on.
The projection is trained with the student: ``Distilled`` wraps both, so the trainer's
optimizer sees it, and only the student is saved.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["DistillSpec", "Distilled", "DistillLoss"]


@dataclass
class DistillSpec:
    kind: Literal["soft", "hard", "token"] = "soft"
    alpha: float = 0.5          # weight of the logit distillation term (the label loss keeps weight 1)
    temperature: float = 2.0    # soft only
    feature_weight: float = 0.0  # > 0 adds feature distillation with a learned projection

    def validate(self, where: str) -> None:
        kinds = typing.get_args(typing.get_type_hints(DistillSpec)["kind"])
        if self.kind not in kinds:  # a recipe's parser checks the Literal; ev.distill(kind=...) does not
            raise ConfigError(f"{where}.kind: {self.kind!r} is not one of {', '.join(kinds)}")
        if self.alpha < 0 or self.feature_weight < 0:
            raise ConfigError(f"{where}: alpha and feature_weight must be non-negative")
        if self.temperature <= 0:
            raise ConfigError(f"{where}.temperature must be positive")


def _classifier(model: nn.Module) -> nn.Module:
    head = model.get_classifier()
    return head[0] if isinstance(head, tuple) else head


class _Capture:
    """Keeps the input of a module (pre-logit features) from the latest forward."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.value = args[0]


class _CaptureOut(_Capture):
    def __init__(self, module: nn.Module) -> None:
        self.value = None
        self.handle = module.register_forward_hook(lambda m, a, out: setattr(self, "value", out))


class Distilled(nn.Module):
    """Student plus the trainable parts of distillation; forward is the student's."""

    def __init__(self, student: nn.Module, teacher: nn.Module, spec: DistillSpec, img_shape: tuple[int, int, int],
                 teacher_img_shape: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        self.student = student
        self.proj: nn.Module | None = None
        if spec.feature_weight > 0:
            with torch.no_grad():
                x, xt = torch.zeros(2, *img_shape), torch.zeros(2, *(teacher_img_shape or img_shape))
                s_dim = student.eval().forward_head(student.forward_features(x), pre_logits=True).shape[-1]
                t_dim = teacher.eval().forward_head(teacher.forward_features(xt), pre_logits=True).shape[-1]
            self.proj = nn.Linear(s_dim, t_dim)  # (B, C_s) -> (B, C_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def no_weight_decay(self) -> set[str]:
        nwd = getattr(self.student, "no_weight_decay", lambda: set())()
        return {f"student.{n}" for n in nwd}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.student.set_grad_checkpointing(enable)


class DistillLoss:
    """A ``LossTerm``: (model, x, y, logits) -> {"distill": ..., "feature": ...}."""

    def __init__(self, teacher: nn.Module, wrapped: Distilled, spec: DistillSpec,
                 teacher_input: nn.Module | None = None) -> None:
        self.teacher, self.spec = teacher.eval().requires_grad_(False), spec
        self.teacher_input = teacher_input  # student batch -> teacher's size and normalization
        student = wrapped.student
        self.dist_head = getattr(student, "head_dist", None) if spec.kind == "token" else None
        self._dist_out = _CaptureOut(self.dist_head) if self.dist_head is not None else None
        self._feat_s = _Capture(_classifier(student)) if spec.feature_weight > 0 else None
        self._feat_t = _Capture(_classifier(teacher)) if spec.feature_weight > 0 else None

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            xt = self.teacher_input(x) if self.teacher_input is not None else x
            t_logits = self.teacher(xt).float()  # (B, K)
        s = self.spec
        out: dict[str, torch.Tensor] = {}
        if s.kind == "soft":
            T = s.temperature
            kl = F.kl_div(F.log_softmax(logits.float() / T, -1), F.log_softmax(t_logits / T, -1),
                          reduction="batchmean", log_target=True)
            out["distill"] = s.alpha * kl * T * T
        else:
            student_logits = self._dist_out.value if self._dist_out is not None else logits
            out["distill"] = s.alpha * F.cross_entropy(student_logits.float(), t_logits.argmax(-1))
        if self._feat_s is not None:
            proj = model.proj if isinstance(model, Distilled) else None
            fs, ft = self._feat_s.value, self._feat_t.value  # (B, C_s), (B, C_t)
            out["feature"] = s.feature_weight * F.mse_loss(proj(fs.float()), ft.float())
        return out
