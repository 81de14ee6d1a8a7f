"""The sparse_attention stage: profile the newest model's attention on training images, choose
per head the cheapest policy keeping ``recovery`` of its mass, swap the Attention modules,
optionally fine-tune, and write the model with its policies in the spec; the summary reports
accuracy before/after and block density per layer and head. With ``data`` (COCO) it does the
same to the newest detector's ViT backbone (at the detection size) and reports COCO mAP."""
from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from typing import Any

from ..attention import SparseAttentionConfig, density_report, sparsify_attention_, with_policies
from ..detection.data import CocoDataConfig, CocoSamples, check_coco
from ..engine.evaluate import evaluate
from ..errors import ConfigError
from ..models.io import load_model, save_model
from .base import MODEL_DIR, Stage, register_stage
from .common import build_recipe_loaders
from .detection import previous_detector_dir

__all__ = ["SparseAttentionStageConfig", "SparseAttentionStage"]


@dataclass
class SparseAttentionStageConfig(SparseAttentionConfig):
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


@register_stage
class SparseAttentionStage(Stage):
    type = "sparse_attention"
    Config = SparseAttentionStageConfig

    @staticmethod
    def preflight(cfg: SparseAttentionStageConfig, recipe, index: int) -> None:
        if cfg.data is not None:
            if not any(s.type == "train_detection" for s in recipe.stages[:index - 1]):
                raise ConfigError(f"stage {index} (sparse_attention with data) needs a train_detection stage before it")
            check_coco(cfg.data)

    def run(self) -> dict[str, Any]:
        if self.cfg.data is not None:
            return self._run_detector()
        cfg, ctx = self.cfg, self.ctx
        t0 = time.perf_counter()
        model, spec = load_model(ctx.previous_model_dir(), map_location=ctx.device)
        model.to(ctx.device).eval()
        loaders = build_recipe_loaders(ctx.recipe, ctx.device)
        calib = [x for x, _ in itertools.islice(loaders.train.epoch(0), cfg.calib_batches)]
        dense_eval = evaluate(model, loaders.eval, ctx.device, "off")
        policies = sparsify_attention_(model, cfg, calib, ctx.device)
        summary: dict[str, Any] = {"dense": dense_eval, "sparse": evaluate(model, loaders.eval, ctx.device, "off")}
        if cfg.finetune_epochs:
            model = self._finetune(model, spec, loaders)
            summary["finetuned"] = evaluate(model, loaders.eval, ctx.device, "off")
        final = summary.get("finetuned", summary["sparse"])
        out = ctx.stage_dir / MODEL_DIR
        save_model(model, with_policies(spec, policies), out)
        return {**summary, "top1": final["top1"], "top1_drop": dense_eval["top1"] - final["top1"],
                "recovery": cfg.recovery, "block": cfg.block, "density": density_report(policies),
                "model": spec.name, "wall_time_s": time.perf_counter() - t0}

    def _run_detector(self) -> dict[str, Any]:
        from ..detection.evaluate import evaluate_coco
        from ..detection.io import DETECTOR_DIR, load_detector, save_detector
        from ..detection.sparse_attention import sparsify_detector_

        cfg, ctx = self.cfg, self.ctx
        t0 = time.perf_counter()
        clean, _ = check_coco(cfg.data)
        detector, spec = load_detector(previous_detector_dir(ctx))
        detector.to(ctx.device)
        evaluation = CocoSamples(cfg.data, clean, train=False)

        def metrics() -> dict[str, Any]:
            m = evaluate_coco(detector, evaluation, ctx.device, cfg.data.batch_size)
            return {k: v for k, v in m.items() if k != "cocoeval"}

        dense = metrics()
        policies = sparsify_detector_(detector, cfg, CocoSamples(cfg.data, clean, train=True), ctx.device,
                                      cfg.data.batch_size)
        sparse = metrics()
        save_detector(detector.cpu(), dataclasses.replace(spec, attention=policies), ctx.stage_dir / DETECTOR_DIR)
        return {"dense": dense, "sparse": sparse, "bbox_mAP": sparse["bbox_mAP"],
                "bbox_mAP_drop": dense["bbox_mAP"] - sparse["bbox_mAP"], "recovery": cfg.recovery,
                "block": cfg.block, "density": density_report(policies), "backbone": spec.backbone["name"],
                "wall_time_s": time.perf_counter() - t0}

    def _finetune(self, model, spec, loaders):
        from ..engine import TrainConfig, Trainer
        from ..engine.config import SchedulerConfig
        from ..engine.optim import OptimizerConfig

        train_cfg = TrainConfig(epochs=self.cfg.finetune_epochs,
                                optimizer=OptimizerConfig(name="adamw", lr=self.cfg.finetune_lr, weight_decay=0.0),
                                scheduler=SchedulerConfig(name="cosine"), label_smoothing=0.0, amp="off", eval_every=0)
        trainer = Trainer(model, train_cfg, loaders, device=self.ctx.device, out_dir=self.ctx.stage_dir / "finetune",
                          num_classes=spec.num_classes, seed=self.ctx.recipe.seed, dist=self.ctx.dist,
                          augment=self.ctx.recipe.data.augment)
        return trainer.fit(resume=self.ctx.resume).model
