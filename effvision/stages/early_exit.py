"""The early_exit stage: exit heads after chosen blocks of the newest model, trained jointly with
it, the exit threshold calibrated to an accuracy budget, and measured where early exit pays:
the fraction of blocks run on the test set and batch-1 latency on this machine."""
from __future__ import annotations

import itertools
import shutil
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import timm
import torch

from ..dynamic.early_exit import (ExitConfig, ExitLoss, attach_exits_, blocks_fraction, calibrate_threshold,
                                  certainty, exit_entry, exit_logits, run_early_exit, _check)
from ..engine import Hooks, TrainConfig, Trainer
from ..errors import ConfigError
from ..models.io import load_model, save_model
from .base import MODEL_DIR, Stage, register_stage
from .common import build_recipe_loaders

__all__ = ["EarlyExitStageConfig", "EarlyExitStage"]


@dataclass
class EarlyExitStageConfig(TrainConfig):
    type: str = "early_exit"
    exits: ExitConfig = field(default_factory=ExitConfig)
    latency_images: int = 64    # test images timed one by one (full model vs early exit), on the CPU
    onnx: bool = True           # also export the segment graphs and time the onnxruntime runner

    def validate(self, where: str) -> None:
        super().validate(where)
        self.exits.validate(f"{where}.exits")


@register_stage
class EarlyExitStage(Stage):
    type = "early_exit"
    Config = EarlyExitStageConfig
    resumable = True  # the trainer's checkpoints hold the heads with the backbone

    @classmethod
    def preflight(cls, cfg: EarlyExitStageConfig, recipe: Any, index: int) -> None:
        """Exit indices against the recipe's architecture (pruning never changes the depth)."""
        import effvision.models.small_vit  # noqa: F401  (registration)

        model = timm.create_model(recipe.model.name, num_classes=2, **recipe.model.kwargs)
        _check(model, list(cfg.exits.after), f"stages[{index - 1}].exits.after")
        aug = recipe.data.augment
        if (aug.mixup > 0 or aug.cutmix > 0) and any(w > 0 for w in (cfg.exits.weights or [1.0])):
            raise ConfigError(f"stages[{index - 1}].exits: exit heads learn from the labels, which mixup/cutmix "
                              f"blend; set data.augment.mixup/cutmix to 0, or exits.weights to 0 with exits.distill")

    def run(self) -> dict[str, Any]:
        ctx, cfg = self.ctx, self.cfg
        t0 = time.perf_counter()
        model, spec = load_model(ctx.previous_model_dir())
        loaders = build_recipe_loaders(ctx.recipe, ctx.device)
        attach_exits_(model, list(cfg.exits.after))
        hooks = Hooks(loss_terms=[ExitLoss(model, cfg.exits)])
        trainer = Trainer(model, cfg, loaders, device=ctx.device, out_dir=ctx.stage_dir, num_classes=spec.num_classes,
                          seed=ctx.recipe.seed, dist=ctx.dist, augment=ctx.recipe.data.augment, hooks=hooks)
        result = trainer.fit(resume=ctx.resume)
        model = result.model.eval()
        # data.holdout's validation split when the recipe has one, else training batches (seen in training)
        source = loaders.val if loaders.val is not None else loaders.train
        calib = list(itertools.islice(source.epoch(0), cfg.exits.calib_batches))
        if cfg.exits.threshold is None:
            policy = calibrate_threshold(model, calib, cfg.exits.criterion, cfg.exits.accuracy_budget)
            threshold = policy["threshold"]
        else:
            threshold, policy = cfg.exits.threshold, {"threshold": cfg.exits.threshold}
        test = _test_report(model, loaders.eval, threshold, cfg.exits.criterion)
        latency = {"torch": _batch1_latency(model, loaders.eval, threshold, cfg.exits.criterion, cfg.latency_images)}
        spec.transforms = [*spec.transforms, exit_entry(cfg.exits.after, cfg.exits.criterion, threshold)]
        save_model(model, spec, ctx.stage_dir / MODEL_DIR)
        if cfg.onnx:  # the segment graphs and their batch-1 runner, timed beside the plain graph
            from ..dynamic.early_exit_onnx import export_early_exit, ort_batch1_latency

            folder = ctx.stage_dir / "onnx"
            shutil.rmtree(folder, ignore_errors=True)  # this stage's own output, redone on --resume
            export_early_exit(model, folder, (spec.in_chans, spec.img_size, spec.img_size), threshold,
                              cfg.exits.criterion)
            latency["onnxruntime"] = ort_batch1_latency(folder, _images(loaders.eval, cfg.latency_images).numpy())
        policy["split"] = "holdout" if loaders.val is not None else "train"
        return {"top1": test["early_exit_top1"], **test, "calibration": policy, "threshold": threshold,
                "criterion": cfg.exits.criterion, "exits_after": list(cfg.exits.after), "latency": latency,
                "train_time_s": result.train_time_s, "model": spec.name, "wall_time_s": time.perf_counter() - t0}


@torch.no_grad()
def _test_report(model: torch.nn.Module, loader: Any, threshold: float, criterion: str) -> dict[str, Any]:
    """Top-1 of every head, of the full model, and of the early-exit policy on the test split."""
    outs, labels = [], []
    for x, y in loader.epoch(0):
        outs.append([z.cpu() for z in exit_logits(model, x)])
        labels.append(y.cpu())
    y = torch.cat(labels)
    logits = [torch.cat([o[e] for o in outs]) for e in range(len(outs[0]))]
    certs = torch.stack([certainty(z, criterion) for z in logits])
    preds = torch.stack([z.argmax(-1) for z in logits])
    take = certs >= threshold
    take[-1] = True
    first = take.float().argmax(0)
    pred = preds.gather(0, first[None])[0]
    acc = [100.0 * float((p == y).float().mean()) for p in preds]
    return {"full_top1": acc[-1], "exit_top1": dict(zip(map(str, model.exit_after), acc[:-1])),
            "early_exit_top1": 100.0 * float((pred == y).float().mean()),
            "blocks_fraction": blocks_fraction(model, first),
            "exit_share": [float((first == e).float().mean()) for e in range(len(logits))]}


def _images(loader: Any, n: int) -> torch.Tensor:
    """The first ``n`` test images on the CPU, (n, C, H, W)."""
    out, seen = [], 0
    for x, _ in loader.epoch(0):
        out.append(x.cpu())
        seen += len(x)
        if seen >= n:
            break
    return torch.cat(out)[:n]


@torch.no_grad()
def _batch1_latency(model: torch.nn.Module, loader: Any, threshold: float, criterion: str, n: int) -> dict[str, Any]:
    """Per-image latency on the CPU, the full forward and the early-exit runner alternating image
    by image (the same load on both), medians in ms."""
    cpu = model.cpu().eval()
    images = _images(loader, n)
    full, early = [], []
    for x in images[:3]:  # warm-up
        cpu(x[None]), run_early_exit(cpu, x[None], threshold, criterion)
    for x in images:
        t = time.perf_counter()
        cpu(x[None])
        full.append(time.perf_counter() - t)
        t = time.perf_counter()
        run_early_exit(cpu, x[None], threshold, criterion)
        early.append(time.perf_counter() - t)
    f, e = statistics.median(full) * 1e3, statistics.median(early) * 1e3
    return {"images": len(images), "full_ms_p50": f, "early_exit_ms_p50": e, "speedup": f / e,
            "threads": torch.get_num_threads()}
