"""The export stage: the newest model to ONNX, parity-checked, with a manifest."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError
from ..engine.stage import Stage, register_stage

__all__ = ["ExportConfig", "ExportStage"]


@dataclass
class ExportConfig:
    """The ``export`` stage: the newest model to ONNX, parity-checked against PyTorch, with a manifest."""

    type: str = "export"
    format: Literal["onnx"] = "onnx"
    opset: int = 18
    dynamic_batch: bool = True
    parity_batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    atol: float = 1e-4

    def validate(self, where: str) -> None:
        from effvision.export.onnx import MAX_OPSET, MIN_OPSET

        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ConfigError(f"{where}.opset: {self.opset} is outside {MIN_OPSET}..{MAX_OPSET}")
        if len(self.parity_batch_sizes) < 1 or min(self.parity_batch_sizes) < 1:
            raise ConfigError(f"{where}.parity_batch_sizes: positive batch sizes, at least one")


@register_stage
class ExportStage(Stage):
    type = "export"
    Config = ExportConfig

    def run(self) -> dict[str, Any]:
        from effvision.export import OnnxExportConfig, export_model_dir

        cfg = self.cfg
        onnx_cfg = OnnxExportConfig(opset=cfg.opset, dynamic_batch=cfg.dynamic_batch,
                                    parity_batch_sizes=list(cfg.parity_batch_sizes), atol=cfg.atol)
        return export_model_dir(self.ctx.previous_model_dir(), self.ctx.stage_dir, onnx_cfg, cfg.format)
