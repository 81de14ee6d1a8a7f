"""Class-wise non-maximum suppression as one custom op with a static output shape, so a whole
detector exports through torch.export and runs in onnxruntime, OpenVINO and TensorRT.

``effvision::class_nms(boxes (B, N, 4), scores (B, C, N))`` returns a keep mask (B, C, N) of 1.0 and 0.0 (float:
TensorRT's ScatterND takes no bools): what
``torchvision.ops.batched_nms`` keeps per image, with each class's boxes suppressed among
themselves only, scores above ``score_thresh`` and at most ``max_per_class`` boxes per class.
The mask's shape does not depend on the data, so torch.export needs no unbacked sizes; the
ONNX translation is the standard ``NonMaxSuppression`` op (selected (K, 3) indices) scattered
into that mask (``ScatterND``): onnxruntime and OpenVINO run it, and TensorRT's ONNX parser
imports it as its INMSLayer. torchvision's own ``nms`` has no dynamo ONNX translation
(pytorch/vision#9306), hence this op.
"""
from __future__ import annotations

import torch
from torchvision.ops import batched_nms

__all__ = ["class_nms", "nms_translations"]


@torch.library.custom_op("effvision::class_nms", mutates_args=())
def class_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_thresh: float, score_thresh: float,
              max_per_class: int) -> torch.Tensor:
    """boxes (B, N, 4) xyxy, scores (B, C, N) -> keep mask (B, C, N), 1.0 where kept."""
    b, c, n = scores.shape
    keep = torch.zeros(b, c * n, dtype=torch.bool, device=scores.device)
    for i in range(b):
        flat = scores[i].reshape(-1)                                   # (C*N,) class-major
        idx = torch.nonzero(flat > score_thresh).flatten()
        labels, anchors = idx // n, idx % n
        kept = idx[batched_nms(boxes[i, anchors], flat[idx], labels, iou_thresh)]  # by descending score
        kept_labels = kept // n
        # rank of each kept box within its class (kept is score-sorted): keep the first max_per_class
        same = kept_labels[:, None] == kept_labels[None, :]
        rank = torch.tril(same, diagonal=-1).sum(1)
        keep[i, kept[rank < max_per_class]] = True
    return keep.reshape(b, c, n).to(scores.dtype)


@class_nms.register_fake
def _(boxes: torch.Tensor, scores: torch.Tensor, iou_thresh: float, score_thresh: float,
      max_per_class: int) -> torch.Tensor:
    return torch.empty_like(scores)


def _class_nms_onnx(boxes, scores, iou_thresh: float, score_thresh: float, max_per_class: int):
    from onnxscript import opset18 as op

    selected = op.NonMaxSuppression(boxes, scores, op.Constant(value_ints=[max_per_class]),
                                    op.Constant(value_floats=[iou_thresh]),
                                    op.Constant(value_floats=[score_thresh]), center_point_box=0)  # (K, 3)
    count = op.Shape(selected, start=0, end=1)                                   # [K]
    ones = op.Expand(op.CastLike(op.Constant(value_float=1.0), scores), count)  # (K,)
    empty = op.Expand(op.CastLike(op.Constant(value_float=0.0), scores), op.Shape(scores))  # (B, C, N)
    return op.ScatterND(empty, selected, ones)


def nms_translations() -> dict:
    return {torch.ops.effvision.class_nms.default: _class_nms_onnx}
