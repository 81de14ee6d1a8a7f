"""The sparse_attention stage: profile the newest model's attention on training images, choose
per head the cheapest policy keeping ``recovery`` of its mass, swap the Attention modules,
optionally fine-tune, and save the model with its policies in its record; the summary reports
accuracy before/after and block density per layer and head. With ``data`` (COCO) it does the
same to the newest detector's ViT backbone (the ``detector`` variant, which effvision.detection
registers) and reports COCO mAP."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

from ..data.coco import CocoDataConfig, check_coco
from ..engine import TrainConfig
from ..engine.config import SchedulerConfig
from ..engine.evaluate import evaluate
from ..engine.fit import fit
from ..engine.mode_stage import library_config
from ..engine.optim import OptimizerConfig
from ..engine.stage import Stage, variant
from ..errors import ConfigError
from . import MODE, SparseAttentionConfig, density_report, sparsify_attention_

__all__ = ["SparseAttentionStageConfig", "SparseAttentionStage"]


@dataclass
class SparseAttentionStageConfig(SparseAttentionConfig):
    """The ``sparse_attention`` stage: per-head block-sparse attention policies profiled on training
    images, optionally fine-tuned; with ``data`` (COCO), applied to the newest detector's ViT backbone."""

    type: str = "sparse_attention"
    finetune_epochs: int = 0       # > 0: fine-tune with the sparse attention in place
    finetune_lr: float = 1e-4
    data: CocoDataConfig | None = None  # COCO data: sparsify the newest detector's backbone instead

    def validate(self, where: str = "sparse_attention") -> None:
        super().validate(where)
        if self.finetune_epochs < 0 or self.finetune_lr <= 0:
            raise ConfigError(f"{where}: finetune_epochs >= 0, finetune_lr > 0")
        if self.data is not None and self.finetune_epochs:
            raise ConfigError(f"{where}: finetune_epochs is for classifiers; fine-tune a detector with a "
                              f"train_detection stage after this one")


class SparseAttentionStage(Stage):
    type = "sparse_attention"
    Config = SparseAttentionStageConfig

    @classmethod
    def preflight(cls, cfg: SparseAttentionStageConfig, recipe: Any, index: int) -> None:
        if cfg.data is not None:
            if not any(s.type == "train_detection" for s in recipe.stages[:index - 1]):
                raise ConfigError(f"stage {index} (sparse_attention with data) needs a train_detection stage before it")
            check_coco(cfg.data)

    @classmethod
    def modes(cls, cfg: SparseAttentionStageConfig) -> list[str]:
        return [] if cfg.data is not None else [MODE]  # a detector's backbone keeps its policies in detector.json

    def run(self) -> dict[str, Any]:
        if self.cfg.data is not None:
            return variant(self.type, "detector")(self)
        cfg, ctx = self.cfg, self.ctx
        t0 = time.perf_counter()
        model, spec = ctx.previous_model(on_device=True)
        model.eval()
        loaders = ctx.loaders()
        calib = [x for x, _ in itertools.islice(loaders.train.epoch(0), cfg.calib_batches)]
        dense_eval = evaluate(model, loaders.eval, ctx.device, "off")
        policies = sparsify_attention_(model, library_config(cfg, SparseAttentionConfig), calib, ctx.device)
        summary: dict[str, Any] = {"dense": dense_eval, "sparse": evaluate(model, loaders.eval, ctx.device, "off")}
        if cfg.finetune_epochs:
            train_cfg = TrainConfig(epochs=cfg.finetune_epochs,
                                    optimizer=OptimizerConfig(name="adamw", lr=cfg.finetune_lr, weight_decay=0.0),
                                    scheduler=SchedulerConfig(name="cosine"), label_smoothing=0.0, amp="off",
                                    eval_every=0)
            model = fit(model, train_cfg, loaders, device=ctx.device, out_dir=ctx.stage_dir / "finetune",
                        num_classes=spec.num_classes, spec=spec, seed=ctx.recipe.seed, dist=ctx.dist,
                        augment=ctx.recipe.data.augment, resume=ctx.resume, where=ctx.where).model
            summary["finetuned"] = evaluate(model, loaders.eval, ctx.device, "off")
        final = summary.get("finetuned", summary["sparse"])
        ctx.save_model(model, spec)
        return {**summary, "top1": final["top1"], "top1_drop": dense_eval["top1"] - final["top1"],
                "recovery": cfg.recovery, "block": cfg.block, "density": density_report(policies),
                "model": spec.name, "wall_time_s": time.perf_counter() - t0}
