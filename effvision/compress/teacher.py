"""Find a distillation teacher: an earlier stage of this run, a model directory, a run
directory (its newest model), or a timm model name."""
from __future__ import annotations

import re
from pathlib import Path

import timm
import torch.nn as nn

from ..errors import EffVisionError
from ..models.io import SPEC_FILE, ModelSpec, create_model, load_model

__all__ = ["resolve_teacher", "teacher_source", "check_classes"]

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
    raise EffVisionError(f"distill.teacher '{ref}': not a stage of this run (e.g. '01-train'), a model directory, "
                         f"a run directory with a model, or a timm model name")


def check_classes(teacher: ModelSpec, student: ModelSpec) -> None:
    if teacher.num_classes != student.num_classes or (
            teacher.class_names and student.class_names and teacher.class_names != student.class_names):
        raise EffVisionError(f"distill.teacher {teacher.name} predicts {teacher.num_classes} classes "
                             f"{teacher.class_names[:5] or ''}, the student {student.num_classes} "
                             f"{student.class_names[:5] or ''}: a teacher must share the student's classes")


def resolve_teacher(ref: str, run_dir: Path | None, student: ModelSpec, pretrained: bool = False) -> nn.Module:
    kind, where = teacher_source(ref, run_dir)
    if kind == "dir":
        if not (Path(where) / SPEC_FILE).is_file():
            raise EffVisionError(f"distill.teacher '{ref}': {where} has no model (did that stage run?)")
        model, spec = load_model(where)
    else:
        spec = ModelSpec(name=str(where), num_classes=student.num_classes, img_size=student.img_size,
                         in_chans=student.in_chans, class_names=list(student.class_names))
        model = create_model(spec, pretrained=pretrained)
    check_classes(spec, student)
    return model
