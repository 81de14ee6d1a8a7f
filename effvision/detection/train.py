"""A short training loop for torchvision detectors (their forward returns a dict of losses,
which the classification Trainer does not fit): AdamW/SGD from effvision's optimizer
registry, linear warm-up then cosine decay, gradient clipping, bf16 autocast on CUDA.

Optional feature distillation from a teacher detector: the student's pyramid maps imitate the
teacher's on the same transformed input (FitNets' hint loss, Romero et al., ICLR 2015, applied to
detector feature pyramids as in Li et al., CVPR 2017, "Mimicking Very Efficient Network for Object
Detection"), added to the detection loss."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from ..engine.evaluate import autocast
from ..engine.optim import OptimizerConfig, create_optimizer
from ..errors import EffVisionError, TrainingDiverged
from ..io import append_jsonl

__all__ = ["train_detector", "pyramid_mse", "PyramidDistiller"]


def pyramid_mse(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum over pyramid levels of the mean squared error between the student's and the
    teacher's maps (float32; the levels must match in name and shape)."""
    if list(student) != list(teacher):
        raise EffVisionError(f"student and teacher pyramids differ in levels: {list(student)} vs {list(teacher)}")
    total = None
    for name, s in student.items():
        t = teacher[name]
        if s.shape != t.shape:
            raise EffVisionError(f"student and teacher maps '{name}' differ in shape: {tuple(s.shape)} vs "
                                 f"{tuple(t.shape)} (the teacher needs the student's out_channels and strides)")
        term = torch.nn.functional.mse_loss(s.float(), t.detach().float())
        total = term if total is None else total + term
    assert total is not None, "an empty pyramid"
    return total


class PyramidDistiller:
    """Feature imitation on a student detector's backbone: a forward hook on ``student.backbone``
    runs ``teacher.backbone`` (eval mode, no grad) on the same input (what the student's transform
    made of the images) and keeps the pyramid MSE of that forward for the loss. FitNets' hints
    (Romero et al., 2015) on detector pyramids (Li et al., CVPR 2017)."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        if teacher is student or teacher.backbone is student.backbone:
            raise EffVisionError("the teacher is the student itself; distil from a copy or another detector")
        self.teacher = teacher
        self.loss: torch.Tensor | None = None
        self._handle = student.backbone.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            target = self.teacher.backbone(args[0])
        self.loss = pyramid_mse(output, target)

    def take(self) -> torch.Tensor:
        """The loss of the last forward (once: a forward without one is an error, not a stale loss)."""
        if self.loss is None:
            raise EffVisionError("the student's backbone did not run in this step: no distillation loss")
        loss, self.loss = self.loss, None
        return loss

    def remove(self) -> None:
        self._handle.remove()


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def train_detector(model: nn.Module, loader, *, epochs: int, optimizer: OptimizerConfig, device: torch.device,
                   warmup_steps: int = 0, grad_clip: float | None = None, amp: str = "off",
                   log_every: int = 10, metrics_path: Path | None = None, progress: bool = True,
                   teacher: nn.Module | None = None, distill_weight: float = 1.0) -> dict[str, Any]:
    """Train in place; returns the per-step losses and throughput. With ``teacher`` (a detector
    whose backbone gives the student's pyramid: same levels, ``out_channels`` and strides), each
    step's loss gains ``distill_weight`` x the pyramid MSE (``loss_distill`` in the metrics; the
    result gains ``distill_losses``, the unweighted MSE per step)."""
    if teacher is not None and not (distill_weight >= 0 and math.isfinite(distill_weight)):
        raise EffVisionError(f"distill_weight must be a finite number >= 0, got {distill_weight}")
    distiller = PyramidDistiller(model, teacher) if teacher is not None else None  # refuses the student itself
    teacher_mode = teacher.training if teacher is not None else False
    bar = None
    try:
        model.to(device).train()
        if teacher is not None:  # in eval mode (batch-norm statistics as trained); it runs under no_grad
            teacher.to(device).eval()
        distill_losses: list[float] = []
        opt = create_optimizer(model, optimizer)
        total = epochs * len(loader)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(min(warmup_steps, total), total))
        losses: list[float] = []
        images, t0 = 0, time.perf_counter()
        bar = tqdm(total=total, unit="step", disable=not progress, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 15.0)
        for epoch in range(epochs):
            for batch_images, targets in loader:
                batch_images = [im.to(device, non_blocking=True) for im in batch_images]
                targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
                with autocast(device, amp):
                    parts = model(batch_images, targets)  # {loss_classifier: ..., loss_box_reg: ..., ...}
                if distiller is not None:
                    mse = distiller.take()
                    distill_losses.append(float(mse.detach()))
                    parts = {**parts, "loss_distill": distill_weight * mse}
                loss = sum(parts.values())
                value = float(loss.detach())  # one host sync per step: detection steps are long, NaN checks cheap
                if not math.isfinite(value):
                    raise TrainingDiverged(f"detection loss is {value} at step {len(losses)} "
                                           f"(lower the learning rate or set grad_clip)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                opt.step()
                sched.step()
                losses.append(value)
                images += len(batch_images)
                bar.update(1)
                if len(losses) % log_every == 0 or len(losses) == total:
                    bar.set_postfix(epoch=epoch, loss=f"{value:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
                    if metrics_path is not None:
                        append_jsonl(metrics_path, {"epoch": epoch, "step": len(losses), "loss": value,
                                                    **{k: float(v.detach()) for k, v in parts.items()},
                                                    "lr": opt.param_groups[0]["lr"]})
    finally:
        if bar is not None:
            bar.close()
        if distiller is not None:
            distiller.remove()
            teacher.train(teacher_mode)
    seconds = time.perf_counter() - t0
    result = {"losses": losses, "train_time_s": seconds, "train_img_per_s": images / seconds if seconds else 0.0,
              "steps": len(losses)}
    if distiller is not None:
        result["distill_losses"] = distill_losses
    return result
