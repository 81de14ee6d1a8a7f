"""Find a distillation teacher: an earlier stage of this run, a model directory, a run
directory (its newest model), or a timm model name."""
from __future__ import annotations

import re
from pathlib import Path

import timm
import timm.data
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import EffVisionError
from ..models.io import SPEC_FILE, ModelSpec, create_model, load_model, similar_model_names

__all__ = ["resolve_teacher", "teacher_source", "check_classes", "TeacherInput"]

_STAGE = re.compile(r"^\d\d-[a-z_]+$")


def teacher_source(ref: str, run_dir: Path | None) -> tuple[str, Path | str]:
    """('dir', model dir) or ('timm', name); raises when ``ref`` names nothing."""
    if run_dir is not None and _STAGE.match(ref):
        return "dir", Path(run_dir) / ref / "model"
    path = Path(ref)
    if (path / SPEC_FILE).is_file():
        return "dir", path
    if (path / "model" / SPEC_FILE).is_file():  # a stage directory
        return "dir", path / "model"
    if path.is_dir():
        stages = sorted((d for d in path.iterdir() if _STAGE.match(d.name) and (d / "model" / SPEC_FILE).is_file()),
                        reverse=True)
        if stages:
            return "dir", stages[0] / "model"
    import effvision.models.small_vit  # noqa: F401  (registration)

    if timm.is_model(ref):
        return "timm", ref
    close = similar_model_names(ref)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise EffVisionError(f"distill.teacher '{ref}': not a stage of this run (e.g. '01-train'), a model directory, "
                         f"a run directory with a model, or a timm model name{hint}")


def check_classes(teacher: ModelSpec, student: ModelSpec) -> None:
    if teacher.num_classes != student.num_classes or (
            teacher.class_names and student.class_names and teacher.class_names != student.class_names):
        raise EffVisionError(f"distill.teacher {teacher.name} predicts {teacher.num_classes} classes "
                             f"{teacher.class_names[:5] or ''}, the student {student.num_classes} "
                             f"{student.class_names[:5] or ''}: a teacher must share the student's classes")


def resolve_teacher(ref: str, run_dir: Path | None, student: ModelSpec,
                    pretrained: bool = False) -> tuple[nn.Module, ModelSpec]:
    """The teacher and its spec; the spec's img_size/mean/std are the input the teacher expects."""
    kind, where = teacher_source(ref, run_dir)
    if kind == "dir":
        if not (Path(where) / SPEC_FILE).is_file():
            raise EffVisionError(f"distill.teacher '{ref}': {where} has no model (did that stage run?)")
        model, spec = load_model(where)
    else:
        spec = ModelSpec(name=str(where), num_classes=student.num_classes, img_size=student.img_size,
                         in_chans=student.in_chans, class_names=list(student.class_names))
        model = create_model(spec, pretrained=pretrained)
        # A timm model's own preprocessing (its default size: a ViT at 224 needs 224 inputs).
        data_cfg = timm.data.resolve_model_data_config(model)
        spec.img_size = int(data_cfg["input_size"][-1])
        spec.mean, spec.std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    check_classes(spec, student)
    return model, spec


class TeacherInput(nn.Module):
    """Turns the student's batch into the teacher's input: undo the student's normalization,
    resize to the teacher's size, apply the teacher's normalization (as timm's distillation
    task does); the identity when both share size and normalization."""

    def __init__(self, student: ModelSpec, teacher: ModelSpec) -> None:
        super().__init__()
        self.size = teacher.img_size if teacher.img_size != student.img_size else None
        same_norm = tuple(student.mean) == tuple(teacher.mean) and tuple(student.std) == tuple(teacher.std)
        self.renorm = not same_norm
        # x_t = (x_s * std_s + mean_s - mean_t) / std_t = x_s * scale + shift, per channel
        scale = torch.tensor(student.std) / torch.tensor(teacher.std)
        shift = (torch.tensor(student.mean) - torch.tensor(teacher.mean)) / torch.tensor(teacher.std)
        self.register_buffer("scale", scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, -1, 1, 1), persistent=False)

    @property
    def identity(self) -> bool:
        return self.size is None and not self.renorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H_s, W_s) -> (B, C, H_t, W_t)
        if self.size is not None:
            # Resize before re-normalizing: interpolation is linear, so the order does not matter,
            # and antialiasing keeps a downsized teacher input free of aliasing.
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=self.size < x.shape[-1])
        if self.renorm:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        return x
