"""The dynamic-inference stages: ``early_exit`` (exit heads trained with the model, the threshold calibrated to an
accuracy budget, batch-1 latency measured where early exit pays) and ``contextual_sparsity``
(per-block head/neuron predictors trained against the oracle; recall, top-1 of dense vs oracle
vs predicted, and CPU latency of dense vs the gather path); ``reduce_tokens`` is the generic
mode stage (registered in plugin.py), with the preflight here."""
from __future__ import annotations

import itertools
import shutil
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import timm
import torch

from ..engine import Hooks, TrainConfig
from ..engine.evaluate import evaluate
from ..engine.fit import fit
from ..engine.mode_stage import library_config
from ..engine.stage import Stage
from ..errors import ConfigError
from .contextual import MODE as CONTEXTUAL, ContextualConfig, _shape, check_predictors_dir, contextual_macs, \
    set_contextual_mode_
from .contextual_bench import dense_vs_sparse
from .contextual_train import contextual_sparsity_, predictor_recall
from .early_exit import (MODE, ExitConfig, ExitLoss, _check, attach_exits_, blocks_fraction, calibrate_threshold,
                         certainty, exit_logits, run_early_exit, set_exit_threshold_)
from .reduce import TokenReduceConfig, token_counts

__all__ = ["reduce_preflight", "EarlyExitStageConfig", "EarlyExitStage", "ContextualSparsityConfig",
           "ContextualSparsityStage"]


def reduce_preflight(cfg: TokenReduceConfig, recipe: Any, index: int) -> None:
    """Family, CLS token and merge counts, checked on the recipe's (dense) architecture: pruning
    changes widths, never token counts."""
    import effvision.models.small_vit  # noqa: F401  (registration)

    token_counts(timm.create_model(recipe.model.name, num_classes=2, **recipe.model.kwargs), cfg)


@dataclass
class EarlyExitStageConfig(TrainConfig):
    """The ``early_exit`` stage: exit heads trained with the newest model (the training config's
    keys), the exit threshold calibrated, and batch-1 latency measured."""

    type: str = "early_exit"
    exits: ExitConfig = field(default_factory=ExitConfig)
    latency_images: int = 64    # test images timed one by one (full model vs early exit), on the CPU
    onnx: bool = True           # also export the segment graphs and time the onnxruntime runner

    def validate(self, where: str) -> None:
        super().validate(where)
        self.exits.validate(f"{where}.exits")


class EarlyExitStage(Stage):
    type = "early_exit"
    Config = EarlyExitStageConfig
    resumable = True  # the trainer's checkpoints hold the heads with the backbone
    mode = MODE

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
        model, spec = ctx.previous_model()
        loaders = ctx.loaders()
        attach_exits_(model, cfg.exits)
        result = fit(model, cfg, loaders, device=ctx.device, out_dir=ctx.stage_dir, num_classes=spec.num_classes,
                     spec=spec, seed=ctx.recipe.seed, dist=ctx.dist, augment=ctx.recipe.data.augment,
                     hooks=Hooks(loss_terms=[ExitLoss(model, cfg.exits)]), resume=ctx.resume, run_dir=ctx.run_dir,
                     where=ctx.where)
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
        set_exit_threshold_(model, threshold)
        ctx.save_model(model, spec)
        if cfg.onnx:  # the segment graphs and their batch-1 runner, timed beside the plain graph
            from .early_exit_onnx import export_early_exit, ort_batch1_latency

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


@dataclass
class ContextualSparsityConfig(ContextualConfig):
    """The ``contextual_sparsity`` stage: per-block head/neuron predictors trained on the newest model
    (or reused), with recall, accuracy and CPU latency measured."""

    type: str = "contextual_sparsity"
    calib_batches: int = 8              # training batches whose oracle importance trains the predictors
    recall_batches: int = 4             # test batches the recall is measured on
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])  # [] skips the timing
    latency_iters: int = 50             # alternating dense/sparse calls per batch size (CPU)

    def validate(self, where: str = "contextual_sparsity") -> None:
        super().validate(where)
        if self.calib_batches < 1 or self.recall_batches < 1 or self.latency_iters < 1:
            raise ConfigError(f"{where}: calib_batches, recall_batches and latency_iters must be >= 1")
        if any(b < 1 for b in self.latency_batch_sizes):
            raise ConfigError(f"{where}.latency_batch_sizes: {self.latency_batch_sizes} must be >= 1")


class ContextualSparsityStage(Stage):
    type = "contextual_sparsity"
    Config = ContextualSparsityConfig
    mode = CONTEXTUAL

    @classmethod
    def preflight(cls, cfg: ContextualSparsityConfig, recipe: Any, index: int) -> None:
        """Family and, with ``predictors``, their shapes against the recipe's architecture (a prune
        stage before this one changes widths: then the stage checks the pruned model first thing)."""
        import effvision.models.small_vit  # noqa: F401  (registration)

        model = timm.create_model(recipe.model.name, num_classes=2, **recipe.model.kwargs)
        _shape(model)
        pruned = any(s.type == "prune" for s in recipe.stages[:index - 1])
        if cfg.predictors and not pruned:
            check_predictors_dir(model, cfg.predictors, f"stages[{index - 1}].predictors")

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        ctx, cfg = self.ctx, self.cfg
        model, spec = ctx.previous_model(on_device=True)
        model = model.eval()
        plain = library_config(cfg, ContextualConfig)
        if cfg.predictors:
            check_predictors_dir(model, cfg.predictors)  # before any work
        loaders = ctx.loaders()
        dense = evaluate(model, loaders.eval, ctx.device, "off")
        calib = [x for x, _ in itertools.islice(loaders.train.epoch(0), cfg.calib_batches)]
        training = contextual_sparsity_(model, plain, None if cfg.predictors else calib)
        test_images = [x for x, _ in itertools.islice(loaders.eval.epoch(0), cfg.recall_batches)]
        recall = predictor_recall(model, test_images)
        top1 = {"dense": dense["top1"]}
        for mode, key in (("oracle", "oracle"), ("sparse", "predicted")):
            set_contextual_mode_(model, mode)
            top1[key] = evaluate(model, loaders.eval, ctx.device, "off")["top1"]
        set_contextual_mode_(model, "sparse")
        tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        latency = self._latency(model, test_images)
        ctx.save_model(model, spec)
        heads = [r["heads"] for r in recall]
        neurons = [r["neurons"] for r in recall]
        return {"top1": top1["predicted"], "top1_by_mode": top1, "recall": recall,
                "recall_min": {"heads": min(heads), "neurons": min(neurons)},
                "recall_mean": {"heads": sum(heads) / len(heads), "neurons": sum(neurons) / len(neurons)},
                "heads_kept": [b.head_k for b in model.blocks], "neurons_kept": [b.mlp_k for b in model.blocks],
                "macs": contextual_macs(model, tokens), "training": training, "latency_cpu": latency,
                "model": spec.name, "wall_time_s": time.perf_counter() - t0}

    def _latency(self, model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict[str, Any]]:
        """Dense vs the gather path on the CPU, per batch size, the two alternating call by call."""
        pool = torch.cat(images).cpu()
        cpu = model.cpu()
        out = [{**dense_vs_sparse(cpu, pool[:b], iters=self.cfg.latency_iters), "threads": torch.get_num_threads()}
               for b in self.cfg.latency_batch_sizes if b <= len(pool)]
        model.to(self.ctx.device)
        return out
