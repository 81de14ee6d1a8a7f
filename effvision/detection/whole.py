"""A whole one-stage detector (RetinaNet, FCOS) as one tensor-in, tensors-out module that exports
to ONNX: image -> resize -> normalize -> backbone -> neck -> heads -> box decoding -> class-wise
NMS -> a fixed number of detections per image, padded, with a count.

``WholeDetector(detector, size)`` computes exactly what torchvision's detector returns when its
transform resizes every image to ``size`` (its ``fixed_size``): the same per-level candidate
selection (``topk_candidates`` best scores per level, above ``score_thresh``), the same box
coder, clipping, class-wise NMS and ``detections_per_img`` cut, written with static shapes so
that torch.export and TensorRT can take it. The anchors are constants (the input size to the
backbone is fixed); the image itself may have any size and batch: it is resized in the graph
(bilinear, as torchvision's transform) and boxes come back in its own pixel coordinates.

Why by hand: torchvision's postprocess loops over images and levels with data-dependent shapes
(boolean indexing, ``nonzero``), which torch.export refuses (pytorch/vision#9306, #9462).
Faster R-CNN (RPN proposals -> RoIAlign -> per-class box head -> a second NMS) is not covered.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.image_list import ImageList

from ..errors import EffVisionError
from .nms import class_nms

__all__ = ["WholeDetector", "OUTPUT_NAMES", "settings_of", "apply_settings"]

OUTPUT_NAMES = ["boxes", "scores", "labels", "count"]


def settings_of(detector: nn.Module, score_thresh: float | None = None, nms_iou: float | None = None,
                max_detections: int | None = None) -> dict[str, Any]:
    """The detector's own post-processing settings, overridden where given; out-of-range values
    are an EffVisionError (one line)."""
    s = {"score_thresh": detector.score_thresh if score_thresh is None else float(score_thresh),
         "nms_iou": detector.nms_thresh if nms_iou is None else float(nms_iou),
         "max_detections": detector.detections_per_img if max_detections is None else int(max_detections),
         "topk_candidates": int(detector.topk_candidates)}
    if not 0.0 < s["nms_iou"] < 1.0:
        raise EffVisionError(f"NMS IoU threshold must be in (0, 1), got {s['nms_iou']}")
    if not 0.0 < s["score_thresh"] < 1.0:
        raise EffVisionError(f"score threshold must be in (0, 1), got {s['score_thresh']}")
    if s["max_detections"] < 1:
        raise EffVisionError(f"max detections per image must be at least 1, got {s['max_detections']}")
    return s


def apply_settings(detector: nn.Module, settings: dict[str, Any]) -> nn.Module:
    """Set the torchvision detector's own post-processing to ``settings`` (the eager reference)."""
    detector.score_thresh = settings["score_thresh"]
    detector.nms_thresh = settings["nms_iou"]
    detector.detections_per_img = settings["max_detections"]
    detector.topk_candidates = settings["topk_candidates"]
    return detector


class WholeDetector(nn.Module):
    """images (B, 3, h, w) float in [0, 1] -> boxes (B, K, 4) xyxy in input pixels, scores (B, K),
    labels (B, K) int64 (torchvision's: 1..num_classes-1; -1 in padding), count (B,) int64."""

    def __init__(self, detector: nn.Module, size: tuple[int, int], settings: dict[str, Any]) -> None:
        super().__init__()
        if not isinstance(detector, (RetinaNet, FCOS)):
            raise EffVisionError(f"whole-detector export covers retinanet and fcos, not {type(detector).__name__}: "
                                 f"its two-stage graph (RPN proposals, RoIAlign, a second NMS) is not written yet; "
                                 f"export its backbone + neck instead (part: backbone)")
        detector.eval()  # before the probe below: a training-mode BatchNorm would learn its zeros
        self.backbone, self.head = detector.backbone, detector.head
        self.box_coder = detector.box_coder
        self.fcos = isinstance(detector, FCOS)
        self.size = (int(size[0]), int(size[1]))  # (H, W) the backbone sees
        self.settings = dict(settings)
        t = detector.transform
        self.register_buffer("mean", torch.tensor(t.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(t.image_std).view(1, -1, 1, 1), persistent=False)
        with torch.no_grad():  # anchors and level sizes at the fixed size: constants of the graph
            x = torch.zeros(1, 3, *self.size)
            feats = list(self.backbone(x).values())
            anchors = detector.anchor_generator(ImageList(x, [self.size]), feats)[0]  # (N, 4)
            hw = [f.shape[-2] * f.shape[-1] for f in feats]
            per_location = anchors.shape[0] // sum(hw)   # anchors per location (RetinaNet: 9, FCOS: 1)
        self.register_buffer("anchors", anchors, persistent=False)
        self.level_sizes = [n * per_location for n in hw]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:  # images: (B, 3, h, w)
        b = images.shape[0]
        h, w = images.shape[-2:]
        x = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        out = self.head(list(self.backbone(x).values()))
        scores = torch.sigmoid(out["cls_logits"])                      # (B, N, C)
        if self.fcos:
            scores = torch.sqrt(scores * torch.sigmoid(out["bbox_ctrness"]))  # ctrness: (B, N, 1)
        n, c = scores.shape[1:]
        boxes = self._decode(out["bbox_regression"])                   # (B, N, 4) in the resized frame
        limit = boxes.new_tensor([self.size[1], self.size[0]] * 2)
        boxes = torch.minimum(boxes.clamp(min=0), limit)               # clip_boxes_to_image
        candidates = self._candidates(scores)                          # (B, N, C) 1.0 / 0.0
        nms_scores = (scores * candidates).transpose(1, 2)             # (B, C, N)
        s = self.settings
        keep = class_nms(boxes, nms_scores, s["nms_iou"], s["score_thresh"], s["max_detections"])
        kept = torch.where(keep > 0, nms_scores, torch.full_like(nms_scores, -1.0)).reshape(b, c * n)
        top, idx = kept.topk(min(s["max_detections"], c * n), dim=1)   # (B, K) best first
        valid = top > 0
        labels, anchor = idx // n, idx % n
        picked = torch.gather(boxes, 1, anchor.unsqueeze(-1).expand(-1, -1, 4))  # (B, K, 4)
        sx, sy = w / self.size[1], h / self.size[0]                    # back to the input's pixels
        x1, y1, x2, y2 = picked.unbind(-1)
        picked = torch.stack([x1 * sx, y1 * sy, x2 * sx, y2 * sy], dim=-1) * valid.unsqueeze(-1)
        return (picked, torch.where(valid, top, torch.zeros_like(top)),
                torch.where(valid, labels, torch.full_like(labels, -1)), valid.sum(1))

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:  # codes (B, N, 4) -> boxes (B, N, 4)
        b, n = codes.shape[:2]
        if self.fcos:  # BoxLinearCoder broadcasts over leading dims
            return self.box_coder.decode(codes, self.anchors.expand(b, n, 4))
        return self.box_coder.decode_single(codes.reshape(-1, 4), self.anchors.repeat(b, 1)).reshape(b, n, 4)

    def _candidates(self, scores: torch.Tensor) -> torch.Tensor:
        """torchvision's per-level pre-NMS cut: the ``topk_candidates`` best (anchor, class) scores of
        each level (the score threshold is applied by the NMS)."""
        b, _, c = scores.shape
        parts, start = [], 0
        for size in self.level_sizes:
            level = scores[:, start:start + size].reshape(b, size * c)
            top = level.topk(min(self.settings["topk_candidates"], size * c), dim=1).indices
            parts.append(torch.zeros_like(level).scatter(1, top, 1.0).reshape(b, size, c))
            start += size
        return torch.cat(parts, dim=1)
