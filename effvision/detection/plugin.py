"""What effvision.detection provides: the stages ``train_detection``, ``eval_detection``,
``export_detection``, ``prune_detection`` and ``finetune_detection``, the ``detector`` variant of
the sparse_attention stage, and the gpu_bench sections ``detection`` and ``detection_compressed``."""
from __future__ import annotations

from ..benchmarks.registry import Section, register_section
from ..engine.stage import register_stage, register_variant
from .compress_stages import FinetuneDetectionStage, PruneDetectionStage
from .stages import EvalDetectionStage, ExportDetectionStage, TrainDetectionStage, sparse_attention_on_detector

for _stage in (TrainDetectionStage, EvalDetectionStage, ExportDetectionStage, PruneDetectionStage,
               FinetuneDetectionStage):
    register_stage(_stage)
register_variant("sparse_attention", "detector", sparse_attention_on_detector)
register_section("detection", Section("effvision.detection.gpu_section:detection_section",
                                      "effvision.detection.gpu_section:detection_markdown", priority=60, share=0.10,
                                      min_s=60, title="Detection pipeline check (recipes/detection_coco128.yaml, coco128)",
                                      requires=("pycocotools",), recipes=("recipes/detection_coco128.yaml",),
                                      data=("coco",)))
register_section("detection_compressed",
                 Section("effvision.detection.gpu_section:detection_compressed_section",
                         "effvision.detection.gpu_section:detection_compressed_markdown", priority=61, share=0.10,
                         min_s=120, title="Compressed detector exported whole (recipes/detection_compressed_coco128.yaml)",
                         requires=("pycocotools", "onnxruntime", "onnxscript"),
                         recipes=("recipes/detection_compressed_coco128.yaml",), data=("coco",)))
