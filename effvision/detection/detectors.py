"""torchvision's Faster R-CNN, RetinaNet and FCOS over a ``DetectionBackbone``.

Anchors and RoI pooling follow the backbone's output strides instead of torchvision's
ResNet-FPN defaults, so any backbone (stride 8..64 maps from FPN or a simple pyramid) fits.
Labels are torchvision's: 1..K for the K object classes, 0 for background, so
``num_classes`` is K + 1 for all three detectors (RetinaNet and FCOS, sigmoid-based, never
see class 0 as a positive, as in torchvision's COCO models).
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch.nn as nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from ..errors import EffVisionError
from .backbone import DetectionBackbone

__all__ = ["DETECTORS", "DetectorKind", "build_detector", "anchor_sizes"]

DetectorKind = Literal["fasterrcnn", "retinanet", "fcos"]
DETECTORS: tuple[str, ...] = ("fasterrcnn", "retinanet", "fcos")
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def anchor_sizes(kind: str, strides: list[int]) -> tuple[tuple[float, ...], ...]:
    """Per level: Faster R-CNN one size of 4x the stride; RetinaNet three octave scales of it
    (Lin et al., 2017); FCOS the stride itself (its "anchor" is one point per location)."""
    if kind == "fasterrcnn":
        return tuple((4.0 * s,) for s in strides)
    if kind == "retinanet":
        return tuple(tuple(4.0 * s * 2 ** (i / 3) for i in range(3)) for s in strides)
    return tuple((float(s),) for s in strides)


def build_detector(kind: str, backbone: DetectionBackbone, num_classes: int, *, min_size: int = 512,
                   max_size: int = 853, fixed_size: tuple[int, int] | None = None,
                   detections_per_img: int = 100, representation_size: int = 1024, **options: Any) -> nn.Module:
    """A torchvision detector; ``fixed_size`` (H, W) resizes every image to that size (the
    backbone's own fixed size is used when it takes no other). ``representation_size`` is
    Faster R-CNN's box-head width; ``options`` go to the torchvision constructor (e.g.
    box_batch_size_per_image, rpn_pre_nms_top_n_train, score_thresh)."""
    if kind not in DETECTORS:
        raise EffVisionError(f"unknown detector '{kind}' (available: {', '.join(DETECTORS)})")
    if num_classes < 2:
        raise EffVisionError(f"num_classes counts background too: at least 2, got {num_classes}")
    if kind != "fasterrcnn" and backbone.out_channels % 32:  # their heads' GroupNorm(32, channels)
        raise EffVisionError(f"{kind} needs out_channels divisible by 32, got {backbone.out_channels}")
    if min_size <= 0 or max_size < min_size:
        raise EffVisionError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
    if backbone.fixed_size is not None:
        if fixed_size is not None and tuple(fixed_size) != backbone.fixed_size:
            raise EffVisionError(f"backbone {backbone.spec.name} takes only {backbone.fixed_size} inputs, "
                                 f"not fixed_size {tuple(fixed_size)}")
        fixed_size = backbone.fixed_size
    elif fixed_size is not None and (fixed_size[0] % backbone.divisor or fixed_size[1] % backbone.divisor):
        raise EffVisionError(f"fixed_size {tuple(fixed_size)} is not a multiple of backbone {backbone.spec.name}'s "
                             f"stride {backbone.divisor}")
    sizes = anchor_sizes(kind, backbone.strides)
    ratios = (ASPECT_RATIOS,) * len(sizes) if kind != "fcos" else ((1.0,),) * len(sizes)
    anchors = AnchorGenerator(sizes, ratios)
    if kind == "fasterrcnn":
        # RoIs pool from the strided maps, not the extra "pool" level (as torchvision's FPN models).
        roi_pool = MultiScaleRoIAlign(featmap_names=backbone.names[:-1], output_size=7, sampling_ratio=2)
        box_head = TwoMLPHead(backbone.out_channels * 7 * 7, representation_size)
        model: nn.Module = FasterRCNN(backbone, None, rpn_anchor_generator=anchors, box_roi_pool=roi_pool,
                                      box_head=box_head, box_predictor=FastRCNNPredictor(representation_size, num_classes),
                                      box_detections_per_img=detections_per_img, **options)
    elif kind == "retinanet":
        model = RetinaNet(backbone, num_classes, anchor_generator=anchors, detections_per_img=detections_per_img,
                          **options)
    else:
        model = FCOS(backbone, num_classes, anchor_generator=anchors, detections_per_img=detections_per_img, **options)
        # torchvision starts the box sides at ReLU(~0): zero-size boxes, whose GIoU gradient is zero,
        # so under AdamW the ReLU dies within the first steps and never recovers (box loss stuck at
        # 1.0, every box a point). Start each side at one stride (the codes are in stride units).
        nn.init.constant_(model.head.regression_head.bbox_reg.bias, 1.0)
    # One transform for all three: the backbone's normalisation, sides padded to its stride.
    model.transform = GeneralizedRCNNTransform(
        min_size, max_size, list(backbone.spec.mean), list(backbone.spec.std),
        size_divisible=1 if fixed_size is not None else math.lcm(32, backbone.divisor),  # fixed: no padding
        fixed_size=None if fixed_size is None else (fixed_size[1], fixed_size[0]))  # torchvision's is (W, H)
    return model
