"""The contextual_sparsity stage: per-block head/neuron predictors on the newest model, trained
on calibration batches of the training split against the oracle; reports on the test split the
predictors' recall and top-1 of dense vs oracle vs predicted sparsity (same heads/neurons kept,
so the same FLOPs), and batch-1 / small-batch CPU latency of dense vs the gather path."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import timm
import torch

from ..dynamic.contextual import (ContextualConfig, check_predictors_dir, contextual_entry, contextual_macs,
                                  contextual_sparsity_, set_contextual_mode_, _shape)
from ..dynamic.contextual_bench import dense_vs_sparse
from ..dynamic.contextual_train import predictor_recall
from ..engine.evaluate import evaluate
from ..errors import ConfigError
from ..models.io import load_model, save_model
from .base import MODEL_DIR, Stage, register_stage
from .common import build_recipe_loaders

__all__ = ["ContextualSparsityConfig", "ContextualSparsityStage"]


@dataclass
class ContextualSparsityConfig(ContextualConfig):
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


@register_stage
class ContextualSparsityStage(Stage):
    type = "contextual_sparsity"
    Config = ContextualSparsityConfig

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
        model, spec = load_model(ctx.previous_model_dir(), map_location=ctx.device)
        model = model.to(ctx.device).eval()
        plain = ContextualConfig(head_keep=cfg.head_keep, mlp_keep=cfg.mlp_keep, rank=cfg.rank, steps=cfg.steps,
                                 lr=cfg.lr, predictors=cfg.predictors)
        if cfg.predictors:
            check_predictors_dir(model, cfg.predictors)  # before any work
        loaders = build_recipe_loaders(ctx.recipe, ctx.device)
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
        spec.transforms = [*spec.transforms, contextual_entry(plain, model.blocks[0].ctx_pred.heads[0].out_features)]
        save_model(model, spec, ctx.stage_dir / MODEL_DIR)
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
