"""Compressing a trained detector: ``prune_detection`` (the newest detector's backbone pruned,
effvision.detection.prune; params and backbone MACs before/after, COCO mAP before/after if
asked) and ``finetune_detection`` (the newest detector trained further, same spec and record,
optionally distilled from a teacher detector's pyramid: the dense one before the newest
prune_detection stage, or a detector dir)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..data.coco import CocoDataConfig, CocoSamples, check_coco, detection_loader
from ..engine.optim import OptimizerConfig
from ..engine.stage import Stage, stage_dirs
from ..errors import ConfigError, EffVisionError
from ..models.modes import record_of
from .stages import previous_detector_dir

__all__ = ["PruneDetectionConfig", "PruneDetectionStage", "DetectionDistillConfig", "FinetuneDetectionConfig",
           "FinetuneDetectionStage", "dense_teacher_dir"]

PRUNE_TYPE = "prune_detection"


def _needs_detector_before(recipe: Any, index: int, stage: str) -> None:
    if not any(s.type == "train_detection" for s in recipe.stages[:index - 1]):
        raise ConfigError(f"stages[{index - 1}] ({stage}) needs a train_detection stage before it")


@dataclass
class PruneDetectionConfig:
    """The ``prune_detection`` stage: structured pruning of the newest detector's backbone (trunk
    channels and the neck's inputs; the pyramid's out_channels and the heads are kept)."""

    type: str = PRUNE_TYPE
    ratio: float | None = None        # fraction of channels removed per group (ViT: heads and MLP units), in (0, 1)
    criterion: str = "l2"             # l1 | l2 | random (magnitude; the data-driven criteria are for classifiers)
    round_to: int | None = 8          # channel counts in multiples of this (None: any count)
    evaluate: bool = False            # COCO mAP of the detector before and after pruning, on data
    data: CocoDataConfig = field(default_factory=CocoDataConfig)  # used only with evaluate: true

    def validate(self, where: str) -> None:
        from .prune import MAGNITUDE_CRITERIA

        if self.ratio is None or isinstance(self.ratio, bool) or not 0 < self.ratio < 1:
            raise ConfigError(f"{where}.ratio: {self.ratio} is outside (0, 1) (the fraction of channels removed)")
        if self.criterion not in MAGNITUDE_CRITERIA:
            raise ConfigError(f"{where}.criterion: '{self.criterion}' is not one for detectors (available: "
                              f"{', '.join(MAGNITUDE_CRITERIA)}; taylor/obd need a classification loss)")
        if self.round_to is not None and self.round_to <= 0:
            raise ConfigError(f"{where}.round_to must be positive (or left out)")


class PruneDetectionStage(Stage):
    type = PRUNE_TYPE
    Config = PruneDetectionConfig

    @staticmethod
    def preflight(cfg: PruneDetectionConfig, recipe: Any, index: int) -> None:
        _needs_detector_before(recipe, index, PRUNE_TYPE)
        before = recipe.stages[:index - 1]
        if any(s.type == "sparse_attention" and getattr(s, "data", None) is not None for s in before):
            raise ConfigError(f"stages[{index - 1}] (prune_detection) cannot follow sparse_attention on the detector: "
                              f"its policies are per head of the unpruned attention; put prune_detection first")
        if cfg.evaluate:
            check_coco(cfg.data)

    def run(self) -> dict[str, Any]:
        from .io import DETECTOR_DIR, load_detector, save_detector
        from .prune import backbone_macs, detector_size, prune_detector_

        cfg, ctx = self.cfg, self.ctx
        t0 = time.perf_counter()
        checked = check_coco(cfg.data) if cfg.evaluate else None  # bad data fails before any model is built
        source = previous_detector_dir(ctx)
        detector, spec = load_detector(source)
        evaluation = None
        if checked is not None:
            _same_categories(spec, checked[1].categories, source, cfg.data.root)
            evaluation = CocoSamples(cfg.data, checked[0], train=False)
        size = detector_size(detector)
        macs_before = backbone_macs(detector, size)
        summary: dict[str, Any] = {}
        if evaluation is not None:
            summary["dense"] = _map(detector, evaluation, ctx.device, cfg.data.batch_size)
        detector.cpu()  # Torch-Pruning traces on the CPU: the same graph, no device memory held twice
        result = prune_detector_(detector, cfg.ratio, cfg.criterion, cfg.round_to)
        macs_after = backbone_macs(detector, size)
        if evaluation is not None:
            summary["pruned"] = _map(detector, evaluation, ctx.device, cfg.data.batch_size)
            summary["bbox_mAP"] = summary["pruned"]["bbox_mAP"]
            summary["bbox_mAP_drop"] = summary["dense"]["bbox_mAP"] - summary["pruned"]["bbox_mAP"]
        save_detector(detector.cpu(), spec, ctx.stage_dir / DETECTOR_DIR)
        return {**summary, "ratio": cfg.ratio, "criterion": cfg.criterion, "round_to": cfg.round_to,
                "detector": spec.kind, "backbone": spec.backbone["name"], "detector_dir": str(source),
                "params_m_before": result["params_before"] / 1e6, "params_m_after": result["params_after"] / 1e6,
                "backbone_params_m_before": result["backbone_params_before"] / 1e6,
                "backbone_params_m_after": result["backbone_params_after"] / 1e6,
                "params_fraction": result["params_after"] / result["params_before"],
                "macs_size": list(size), "backbone_gmacs_before": macs_before / 1e9,
                "backbone_gmacs_after": macs_after / 1e9, "macs_fraction": macs_after / macs_before,
                "maps_before": result["maps_before"], "maps_after": result["maps_after"],
                "out_channels": result["out_channels"], "wall_time_s": time.perf_counter() - t0}


def _same_categories(spec: Any, categories: list[dict[str, Any]], detector_dir: Path, root: str) -> None:
    if [c["id"] for c in spec.categories] != [c["id"] for c in categories]:
        raise EffVisionError(f"the detector in {detector_dir} was trained on other categories than {root} holds")


def _map(detector: Any, samples: CocoSamples, device: Any, batch_size: int) -> dict[str, Any]:
    from .evaluate import evaluate_coco

    metrics = evaluate_coco(detector.to(device), samples, device, batch_size)
    return {k: v for k, v in metrics.items() if k != "cocoeval"}


@dataclass
class DetectionDistillConfig:
    """Feature distillation in ``finetune_detection``: the student's pyramid maps imitate the teacher's."""

    teacher: str | None = "dense"     # "dense": the detector before the newest prune_detection stage; or a detector dir; null: off
    weight: float = 1.0               # the pyramid MSE (summed over levels) is added to the detection loss times this

    def validate(self, where: str) -> None:
        if not isinstance(self.weight, (int, float)) or isinstance(self.weight, bool) or not self.weight >= 0 \
                or self.weight == float("inf"):
            raise ConfigError(f"{where}.weight must be a finite number >= 0, got {self.weight!r}")


@dataclass
class FinetuneDetectionConfig:
    """The ``finetune_detection`` stage: the newest detector (a pruned one keeps its record) trained
    further on COCO-format data, optionally distilled from a teacher detector."""

    type: str = "finetune_detection"
    data: CocoDataConfig = field(default_factory=CocoDataConfig)
    epochs: int = 4
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adamw", lr=1e-4,
                                                                               weight_decay=1e-4))
    warmup_steps: int = 20           # linear warm-up, then cosine decay to 0
    grad_clip: float | None = 10.0
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    log_every: int = 10
    distill: DetectionDistillConfig | None = None  # pyramid feature distillation (off when left out)

    def validate(self, where: str) -> None:
        if self.epochs <= 0 or self.log_every <= 0 or self.warmup_steps < 0:
            raise ConfigError(f"{where}: epochs and log_every must be positive, warmup_steps non-negative")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"{where}.grad_clip must be positive")


def dense_teacher_dir(run_dir: Path, index: int) -> Path:
    """The "dense" teacher of stage ``index``: the newest detector of a stage before the newest
    prune_detection stage before ``index``."""
    from .io import DETECTOR_DIR, DETECTOR_FILE

    prunes = [d for d in stage_dirs(run_dir, before=index) if d.name[3:] == PRUNE_TYPE]
    if not prunes:
        raise EffVisionError(f"distill.teacher 'dense' needs a finished prune_detection stage before stage {index:02d}")
    for d in stage_dirs(run_dir, before=int(prunes[0].name[:2])):
        if (d / DETECTOR_DIR / DETECTOR_FILE).is_file():
            return d / DETECTOR_DIR
    raise EffVisionError(f"distill.teacher 'dense': no detector before {prunes[0].name}")


def _check_teacher_dir(path: str, where: str) -> None:
    from ..models.io import WEIGHTS_FILE
    from .io import DETECTOR_FILE

    p = Path(path)
    if not (p / DETECTOR_FILE).is_file() or not (p / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{where}.distill.teacher: {path} is not a detector dir (expected {DETECTOR_FILE} and "
                          f"{WEIGHTS_FILE}; or 'dense', or null)")


class FinetuneDetectionStage(Stage):
    type = "finetune_detection"
    Config = FinetuneDetectionConfig

    @staticmethod
    def preflight(cfg: FinetuneDetectionConfig, recipe: Any, index: int) -> None:
        _needs_detector_before(recipe, index, "finetune_detection")
        check_coco(cfg.data)
        teacher = cfg.distill.teacher if cfg.distill is not None else None
        if teacher == "dense":
            if not any(s.type == PRUNE_TYPE for s in recipe.stages[:index - 1]):
                raise ConfigError(f"stages[{index - 1}].distill.teacher 'dense' needs a prune_detection stage before "
                                  f"this one (or give a detector dir)")
        elif teacher is not None:
            _check_teacher_dir(teacher, f"stages[{index - 1}]")

    def run(self) -> dict[str, Any]:
        from .io import DETECTOR_DIR, load_detector, save_detector
        from .train import train_detector

        cfg, ctx = self.cfg, self.ctx
        t0 = time.perf_counter()
        clean, report = check_coco(cfg.data)  # bad data fails here, before any model is built
        source = previous_detector_dir(ctx)
        detector, spec = load_detector(source)
        _same_categories(spec, report.categories, source, cfg.data.root)
        teacher, teacher_dir = None, None
        if cfg.distill is not None and cfg.distill.teacher is not None:
            if cfg.distill.teacher == "dense":
                teacher_dir = dense_teacher_dir(ctx.run_dir, ctx.index)
            else:
                _check_teacher_dir(cfg.distill.teacher, ctx.where)
                teacher_dir = Path(cfg.distill.teacher)
            teacher, _ = load_detector(teacher_dir)
            _check_pyramids(detector, teacher, teacher_dir)
        samples = CocoSamples(cfg.data, clean, train=True)
        loader = detection_loader(samples, cfg.data.batch_size, shuffle=True, seed=ctx.recipe.seed,
                                  num_workers=cfg.data.num_workers)
        result = train_detector(detector, loader, epochs=cfg.epochs, optimizer=cfg.optimizer, device=ctx.device,
                                warmup_steps=cfg.warmup_steps, grad_clip=cfg.grad_clip, amp=cfg.amp,
                                log_every=cfg.log_every, metrics_path=ctx.stage_dir / "metrics.jsonl",
                                teacher=teacher, distill_weight=cfg.distill.weight if teacher is not None else 0.0)
        save_detector(detector.cpu(), spec, ctx.stage_dir / DETECTOR_DIR)
        losses = result.pop("losses")
        distill = result.pop("distill_losses", None)
        k = max(1, len(losses) // 4)
        summary = {**result, "detector": spec.kind, "backbone": spec.backbone["name"], "detector_dir": str(source),
                   "modes": [e["mode"] for e in record_of(detector)],
                   "params_m": sum(p.numel() for p in detector.parameters()) / 1e6,
                   "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
                   "data": {k2: v for k2, v in dataclasses.asdict(report).items() if k2 != "categories"},
                   "device": str(ctx.device), "wall_time_s": time.perf_counter() - t0}
        if distill is not None:
            summary.update(teacher_dir=str(teacher_dir), distill_weight=cfg.distill.weight,
                           distill_mse_first=sum(distill[:k]) / k, distill_mse_last=sum(distill[-k:]) / k)
        return summary


def _check_pyramids(student: Any, teacher: Any, teacher_dir: Path) -> None:
    s, t = student.backbone, teacher.backbone
    if (s.out_channels, list(s.strides), list(s.names)) != (t.out_channels, list(t.strides), list(t.names)):
        raise EffVisionError(f"distill.teacher {teacher_dir}: its pyramid ({t.out_channels} channels, strides "
                             f"{list(t.strides)}) differs from the student's ({s.out_channels}, {list(s.strides)})")
