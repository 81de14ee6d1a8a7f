"""Detection stages: train_detection (a torchvision detector over the recipe's or the previous
stage's backbone, on COCO-format data), eval_detection (COCO mAP), export_detection
(the whole detector, or its backbone + neck, to ONNX); and the ``detector`` variant of the sparse_attention stage (the
newest detector's ViT backbone sparsified, COCO mAP before and after)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..attention import SparseAttentionConfig, density_report
from ..data.coco import CocoDataConfig, CocoSamples, check_coco, detection_loader
from ..engine.mode_stage import library_config
from ..engine.optim import OptimizerConfig
from ..engine.stage import Stage, stage_dirs
from ..errors import ConfigError, EffVisionError
from ..io import atomic_write_text

__all__ = ["TrainDetectionConfig", "TrainDetectionStage", "EvalDetectionConfig", "EvalDetectionStage",
           "ExportDetectionConfig", "ExportDetectionStage", "export_whole_detector", "sparse_attention_on_detector", "previous_detector_dir"]


@dataclass
class TrainDetectionConfig:
    """The ``train_detection`` stage: a torchvision detector (Faster R-CNN, RetinaNet, FCOS) over
    a timm backbone, trained on COCO-format data."""

    type: str = "train_detection"
    detector: Literal["fasterrcnn", "retinanet", "fcos"] = "fasterrcnn"
    backbone: str | None = None      # name, model dir or run dir; default: previous stage's model, else model.*
    out_channels: int = 256          # FPN / simple-pyramid width
    detector_options: dict[str, Any] = field(default_factory=dict)  # build_detector extras (representation_size, ...)
    data: CocoDataConfig = field(default_factory=CocoDataConfig)
    min_size: int = 512              # torchvision's transform: shorter side resized to this...
    max_size: int = 853              # ...unless the longer side would exceed this
    fixed_size: list[int] | None = None  # (H, W): every image resized to exactly this
    epochs: int = 12
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adamw", lr=1e-4,
                                                                               weight_decay=1e-4))
    warmup_steps: int = 50           # linear warm-up, then cosine decay to 0
    grad_clip: float | None = 10.0
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    log_every: int = 10

    def validate(self, where: str) -> None:
        if self.epochs <= 0 or self.out_channels <= 0 or self.log_every <= 0 or self.warmup_steps < 0:
            raise ConfigError(f"{where}: epochs, out_channels and log_every must be positive, warmup_steps non-negative")
        if self.min_size <= 0 or self.max_size < self.min_size:
            raise ConfigError(f"{where}: need 0 < min_size <= max_size")
        if self.fixed_size is not None and (len(self.fixed_size) != 2 or min(self.fixed_size) <= 0):
            raise ConfigError(f"{where}.fixed_size: two positive sides [H, W] (or left out)")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"{where}.grad_clip must be positive")


def _trunk_source(cfg: TrainDetectionConfig, ctx) -> tuple[Any, dict[str, Any], bool, str | None]:
    """(source, kwargs, pretrained, weights file) of the backbone this stage starts from."""
    if cfg.backbone:
        return cfg.backbone, {}, False, None
    prior = ctx.previous_model_dir(required=False)  # e.g. a pruned or fine-tuned classifier
    if prior is not None:
        return prior, {}, False, None
    m = ctx.recipe.model
    if m.init_from and Path(m.init_from).is_dir():
        return m.init_from, {}, False, None
    return m.name, dict(m.kwargs), m.pretrained, m.init_from


def previous_detector_dir(ctx) -> Path:
    from .io import DETECTOR_DIR, DETECTOR_FILE

    for d in stage_dirs(ctx.run_dir, before=ctx.index):
        if (d / DETECTOR_DIR / DETECTOR_FILE).is_file():
            return d / DETECTOR_DIR
    raise EffVisionError(f"stage {ctx.stage_dir.name} needs a detector; put a 'train_detection' stage before it")


class TrainDetectionStage(Stage):
    type = "train_detection"
    Config = TrainDetectionConfig

    @staticmethod
    def preflight(cfg: TrainDetectionConfig, recipe, index: int) -> None:
        from .source import check_source

        check_coco(cfg.data)
        if cfg.backbone:
            check_source(cfg.backbone)

    def run(self) -> dict[str, Any]:
        from . import DetectorSpec, backbone, build_detector, save_detector
        from .io import DETECTOR_DIR
        from .source import load_trunk
        from .train import train_detector
        from ..models.io import load_weights

        cfg, ctx = self.cfg, self.ctx
        t0 = time.perf_counter()
        clean, report = check_coco(cfg.data)  # bad data fails here, before any model is built
        source, kwargs, pretrained, weights = _trunk_source(cfg, ctx)
        trunk, trunk_spec = load_trunk(source, kwargs, pretrained)
        if weights:
            load_weights(trunk, weights)
        body = backbone(trunk, spec=trunk_spec, out_channels=cfg.out_channels)
        num_classes = len(report.categories) + 1
        detector = build_detector(cfg.detector, body, num_classes, min_size=cfg.min_size, max_size=cfg.max_size,
                                  fixed_size=tuple(cfg.fixed_size) if cfg.fixed_size else None, **cfg.detector_options)
        samples = CocoSamples(cfg.data, clean, train=True)
        loader = detection_loader(samples, cfg.data.batch_size, shuffle=True, seed=ctx.recipe.seed,
                                  num_workers=cfg.data.num_workers)
        result = train_detector(detector, loader, epochs=cfg.epochs, optimizer=cfg.optimizer, device=ctx.device,
                                warmup_steps=cfg.warmup_steps, grad_clip=cfg.grad_clip, amp=cfg.amp,
                                log_every=cfg.log_every, metrics_path=ctx.stage_dir / "metrics.jsonl")
        spec = DetectorSpec(kind=cfg.detector, backbone=dataclasses.asdict(trunk_spec), num_classes=num_classes,
                            categories=report.categories, out_channels=cfg.out_channels, min_size=cfg.min_size,
                            max_size=cfg.max_size, fixed_size=list(body.fixed_size or cfg.fixed_size or []) or None,
                            options=dict(cfg.detector_options))
        save_detector(detector.cpu(), spec, ctx.stage_dir / DETECTOR_DIR)
        losses = result.pop("losses")
        k = max(1, len(losses) // 4)
        return {**result, "detector": cfg.detector, "backbone": trunk_spec.name, "backbone_source": str(source),
                "params_m": sum(p.numel() for p in detector.parameters()) / 1e6,
                "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
                "data": {k2: v for k2, v in dataclasses.asdict(report).items() if k2 != "categories"},
                "device": str(ctx.device), "wall_time_s": time.perf_counter() - t0}


@dataclass
class EvalDetectionConfig:
    """The ``eval_detection`` stage: COCO mAP of the newest detector."""

    type: str = "eval_detection"
    data: CocoDataConfig = field(default_factory=CocoDataConfig)


class EvalDetectionStage(Stage):
    type = "eval_detection"
    Config = EvalDetectionConfig

    @staticmethod
    def preflight(cfg: EvalDetectionConfig, recipe, index: int) -> None:
        check_coco(cfg.data)

    def run(self) -> dict[str, Any]:
        from .evaluate import evaluate_coco
        from .io import load_detector

        ctx = self.ctx
        clean, report = check_coco(self.cfg.data)
        detector_dir = previous_detector_dir(ctx)
        detector, spec = load_detector(detector_dir)
        if [c["id"] for c in spec.categories] != [c["id"] for c in report.categories]:
            raise EffVisionError(f"the detector in {detector_dir} was trained on other categories than "
                                 f"{self.cfg.data.root} holds")
        metrics = evaluate_coco(detector.to(ctx.device), CocoSamples(self.cfg.data, clean, train=False), ctx.device,
                                self.cfg.data.batch_size)
        atomic_write_text(ctx.stage_dir / "cocoeval.txt", metrics.pop("cocoeval", "") + "\n")
        return {**metrics, "detector": spec.kind, "backbone": spec.backbone["name"], "detector_dir": str(detector_dir)}


@dataclass
class ExportDetectionConfig:
    """The ``export_detection`` stage: the newest detector to ONNX, parity-checked. ``part:
    detector`` (RetinaNet, FCOS): the whole detector, image -> boxes, scores, labels, count with
    NMS in the graph; ``part: backbone``: backbone + neck only (any detector)."""

    type: str = "export_detection"
    part: Literal["detector", "backbone"] = "detector"
    format: Literal["onnx", "openvino", "tensorrt"] = "onnx"  # openvino: + model.xml; tensorrt: its op/QDQ rules
    precision: Literal["fp32", "int8"] = "fp32"  # int8: static QDQ calibrated on data (part: detector)
    size: list[int] | None = None    # (H, W); default: the detector's fixed size, else min_size square
    opset: int = 18
    score_thresh: float | None = None    # default: the detector's own (RetinaNet 0.05, FCOS 0.2)
    nms_iou: float | None = None         # default: the detector's own (RetinaNet 0.5, FCOS 0.6)
    max_detections: int | None = None    # detections per image, padded; default: the detector's own (100)
    data: CocoDataConfig | None = None   # parity images, int8 calibration and mAP (part: detector)
    calib_images: int = 32               # int8 calibration images from data
    map_tolerance: float = 0.005         # fp32: exported mAP within this of PyTorch's on data
    box_atol: float = 1e-3               # fp32 parity: box corners (pixels)
    score_atol: float = 1e-4             # fp32 parity: scores
    atol: float = 1e-3               # part backbone: fp32 max abs error on the feature maps (values of order 1-10)
    dynamic_hw: bool = False         # part backbone: any height/width that is a multiple of the backbone's divisor

    def validate(self, where: str) -> None:
        if self.size is not None and (len(self.size) != 2 or min(self.size) <= 0):
            raise ConfigError(f"{where}.size: two positive sides [H, W] (or left out)")
        if self.nms_iou is not None and not 0.0 < self.nms_iou < 1.0:
            raise ConfigError(f"{where}.nms_iou must be in (0, 1), got {self.nms_iou}")
        if self.score_thresh is not None and not 0.0 < self.score_thresh < 1.0:
            raise ConfigError(f"{where}.score_thresh must be in (0, 1), got {self.score_thresh}")
        if self.max_detections is not None and self.max_detections < 1:
            raise ConfigError(f"{where}.max_detections must be at least 1, got {self.max_detections}")
        if self.calib_images < 1:
            raise ConfigError(f"{where}.calib_images must be at least 1")
        if self.part == "backbone" and (self.precision != "fp32" or self.format != "onnx"):
            raise ConfigError(f"{where}: part backbone exports fp32 ONNX only (precision and format are for part "
                              f"detector)")
        if self.part == "detector" and self.dynamic_hw:
            raise ConfigError(f"{where}.dynamic_hw is for part backbone; the whole detector takes any image size "
                              f"(it resizes in the graph)")
        if self.precision == "int8" and self.data is None:
            raise ConfigError(f"{where}: precision int8 needs data (COCO images to calibrate on)")


class ExportDetectionStage(Stage):
    type = "export_detection"
    Config = ExportDetectionConfig

    @staticmethod
    def preflight(cfg: ExportDetectionConfig, recipe, index: int) -> None:
        if cfg.data is not None:
            check_coco(cfg.data)

    def run(self) -> dict[str, Any]:
        from .export import export_backbone

        cfg = self.cfg
        source = previous_detector_dir(self.ctx)
        if cfg.part == "backbone":
            return export_backbone(source, self.ctx.stage_dir, tuple(cfg.size) if cfg.size else None, cfg.opset,
                                   cfg.atol, cfg.dynamic_hw)
        return export_whole_detector(source, self.ctx.stage_dir, cfg)


def export_whole_detector(source: Path, out_dir: Path, cfg: ExportDetectionConfig) -> dict[str, Any]:
    """``export_detector`` with the config's data: parity and calibration on its images, then the
    COCO mAP of PyTorch (resizing to the export size) against the exported file's."""
    from .evaluate import evaluate_coco
    from .export import ExportedDetector, export_detector, reference_detector

    t0 = time.perf_counter()
    samples = images = None
    if cfg.data is not None:
        from .io import load_detector

        clean, report = check_coco(cfg.data)
        if [c["id"] for c in load_detector(source)[1].categories] != [c["id"] for c in report.categories]:
            raise EffVisionError(f"the detector in {source} was trained on other categories than {cfg.data.root} holds")
        samples = CocoSamples(cfg.data, clean, train=False)
        images = [samples[i][0] for i in range(min(len(samples), max(cfg.calib_images, 16)))]
    result = export_detector(source, out_dir, size=tuple(cfg.size) if cfg.size else None, opset=cfg.opset,
                             fmt=cfg.format, precision=cfg.precision, score_thresh=cfg.score_thresh,
                             nms_iou=cfg.nms_iou, max_detections=cfg.max_detections,
                             images=images[:cfg.calib_images] if images else None, box_atol=cfg.box_atol,
                             score_atol=cfg.score_atol)
    if samples is not None:
        import torch

        cpu = torch.device("cpu")
        eager = reference_detector(source, result["size"], result["postprocess"])
        m_eager = evaluate_coco(eager, samples, cpu, cfg.data.batch_size)
        m_onnx = evaluate_coco(ExportedDetector(result["onnx"]), samples, cpu, cfg.data.batch_size)
        diff = m_onnx["bbox_mAP"] - m_eager["bbox_mAP"]
        result["map"] = {"pytorch": m_eager["bbox_mAP"], "exported": m_onnx["bbox_mAP"], "difference": diff,
                         "pytorch_map50": m_eager["bbox_mAP50"], "exported_map50": m_onnx["bbox_mAP50"],
                         "images": m_onnx["images"]}
        if cfg.precision == "fp32" and abs(diff) > cfg.map_tolerance:
            raise EffVisionError(f"the exported detector's mAP {m_onnx['bbox_mAP']:.4f} differs from PyTorch's "
                                 f"{m_eager['bbox_mAP']:.4f} by more than {cfg.map_tolerance}")
    result["wall_time_s"] = time.perf_counter() - t0
    return result


def sparse_attention_on_detector(stage: Stage) -> dict[str, Any]:
    """The sparse_attention stage with ``data``: the newest detector's backbone, profiled at the detection size."""
    from .evaluate import evaluate_coco
    from .io import DETECTOR_DIR, load_detector, save_detector
    from .sparse_attention import sparsify_detector_

    cfg, ctx = stage.cfg, stage.ctx
    t0 = time.perf_counter()
    clean, _ = check_coco(cfg.data)
    detector, spec = load_detector(previous_detector_dir(ctx))
    detector.to(ctx.device)
    evaluation = CocoSamples(cfg.data, clean, train=False)

    def metrics() -> dict[str, Any]:
        m = evaluate_coco(detector, evaluation, ctx.device, cfg.data.batch_size)
        return {k: v for k, v in m.items() if k != "cocoeval"}

    dense = metrics()
    policies = sparsify_detector_(detector, library_config(cfg, SparseAttentionConfig),
                                  CocoSamples(cfg.data, clean, train=True), ctx.device, cfg.data.batch_size)
    sparse = metrics()
    save_detector(detector.cpu(), dataclasses.replace(spec, attention=policies), ctx.stage_dir / DETECTOR_DIR)
    return {"dense": dense, "sparse": sparse, "bbox_mAP": sparse["bbox_mAP"],
            "bbox_mAP_drop": dense["bbox_mAP"] - sparse["bbox_mAP"], "recovery": cfg.recovery,
            "block": cfg.block, "density": density_report(policies), "backbone": spec.backbone["name"],
            "wall_time_s": time.perf_counter() - t0}
