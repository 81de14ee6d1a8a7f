"""The quantize stage: post-training quantization of the newest model (calibrated on the
recipe's training split), optional accuracy-budgeted fallback, optional QAT through the
trainer; writes the fake-quant model as spec + safetensors + quant.json."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

from ..compress.quantize import QuantConfig, quant_modules, quant_spec, quantize_, write_quant_spec
from ..compress.quantize.api import check_calibration_set
from ..compress.quantize.measured import measure_int8_layers_, resolve_runtime
from ..engine.evaluate import evaluate
from ..errors import ConfigError
from ..models.io import load_model, save_model
from .base import MODEL_DIR, Stage, register_stage
from .common import build_recipe_loaders

__all__ = ["QuantizeConfig", "QuantizeStage"]


@dataclass
class QuantizeConfig(QuantConfig):
    type: str = "quantize"
    val_batches: int = 8           # training-split batches that judge the fallback (not the test split)
    qat_epochs: int = 0            # > 0: fine-tune the fake-quant model (straight-through estimator)
    qat_lr: float = 1e-4

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.qat_epochs < 0 or self.qat_lr <= 0 or self.val_batches < 1:
            raise ConfigError(f"{where}: qat_epochs >= 0, qat_lr > 0, val_batches >= 1")


@register_stage
class QuantizeStage(Stage):
    type = "quantize"
    Config = QuantizeConfig

    def run(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        t0 = time.perf_counter()
        model_dir = ctx.previous_model_dir()
        loaders = build_recipe_loaders(ctx.recipe, ctx.device)
        batches = list(itertools.islice(loaders.train.epoch(0), cfg.calib_batches + cfg.val_batches))
        calib, val = batches[: cfg.calib_batches], batches[cfg.calib_batches:] or batches
        check_calibration_set(calib, cfg)  # before any work
        runtime = resolve_runtime(cfg) if cfg.int8_layers == "measured" else None
        model, spec = load_model(model_dir, map_location=ctx.device)
        model.to(ctx.device).eval()
        float_eval = evaluate(model, loaders.eval, ctx.device, "off")
        report = quantize_(model, cfg, calib, val)
        ptq_eval = evaluate(model, loaders.eval, ctx.device, "off")
        summary: dict[str, Any] = {"float": float_eval, "ptq": ptq_eval, "report": report.to_dict()}
        if cfg.qat_epochs:
            model = self._qat(model, spec, loaders)
            summary["qat"] = evaluate(model, loaders.eval, ctx.device, "off")
        measured = None
        if runtime is not None:  # groups INT8 does not speed up in the runtime go back to float
            measured = measure_int8_layers_(model.cpu(), cfg, (spec.in_chans, spec.img_size, spec.img_size), runtime)
            summary["measured"] = evaluate(model.to(ctx.device), loaders.eval, ctx.device, "off")
        final = summary.get("measured", summary.get("qat", ptq_eval))
        out = ctx.stage_dir / MODEL_DIR
        # quant.json first: a reader that sees model.json always finds the quantization it needs
        write_quant_spec(out, quant_spec(model, cfg.precision, cfg.target, cfg.learnable_scales,
                                         calibration={"method": cfg.calib_method, "batches": cfg.calib_batches,
                                                      "samples": report.calib_samples},
                                         fallback=report.fallback, int8_layers=measured or {"mode": "all"}))
        save_model(model, spec, out)
        return {**summary, "top1": final["top1"], "top1_drop": float_eval["top1"] - final["top1"],
                "precision": cfg.precision, "target": cfg.target, "quantized_layers": len(quant_modules(model)),
                "fallback_layers": report.fallback, "model": spec.name,
                **({"int8_layers": measured} if measured else {}), "wall_time_s": time.perf_counter() - t0}

    def _qat(self, model, spec, loaders):
        from ..engine import TrainConfig, Trainer
        from ..engine.config import SchedulerConfig
        from ..engine.optim import OptimizerConfig

        train_cfg = TrainConfig(epochs=self.cfg.qat_epochs, optimizer=OptimizerConfig(name="adamw", lr=self.cfg.qat_lr,
                                                                                      weight_decay=0.0),
                                scheduler=SchedulerConfig(name="cosine"), label_smoothing=0.0, amp="off", eval_every=0)
        trainer = Trainer(model, train_cfg, loaders, device=self.ctx.device, out_dir=self.ctx.stage_dir / "qat",
                          num_classes=spec.num_classes, seed=self.ctx.recipe.seed, dist=self.ctx.dist,
                          augment=self.ctx.recipe.data.augment)
        return trainer.fit(resume=self.ctx.resume).model
