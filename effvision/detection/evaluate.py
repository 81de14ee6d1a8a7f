"""COCO bbox mAP of a torchvision detector, by pycocotools' COCOeval."""
from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from ..data.coco import CocoSamples, detection_loader

__all__ = ["evaluate_coco"]

_STATS = ("bbox_mAP", "bbox_mAP50", "bbox_mAP75", "bbox_mAP_small", "bbox_mAP_medium", "bbox_mAP_large")


@torch.no_grad()
def evaluate_coco(model: nn.Module, samples: CocoSamples, device: torch.device, batch_size: int = 4,
                  progress: bool = True) -> dict[str, Any]:
    """COCO metrics over ``samples`` (boxes come back in original image coordinates)."""
    from pycocotools.cocoeval import COCOeval

    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    for images, targets in tqdm(detection_loader(samples, batch_size, shuffle=False), desc="eval", unit="batch",
                                disable=not progress, leave=False):
        outputs = model([im.to(device) for im in images])
        for target, out in zip(targets, outputs):
            image_ids.append(int(target["image_id"]))
            boxes = out["boxes"].float().cpu()  # (N, 4) xyxy
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            for box, score, label in zip(xywh, out["scores"].tolist(), out["labels"].tolist()):
                if label >= 1:  # 0 is background (RetinaNet/FCOS could in principle score it)
                    results.append({"image_id": image_ids[-1], "category_id": samples.category_ids[label - 1],
                                    "bbox": box, "score": score})
    model.train(was_training)
    metrics: dict[str, Any] = {"images": len(image_ids), "detections": len(results)}
    if not results:  # COCO's loadRes rejects an empty list; no detection is zero precision
        return {**metrics, **{k: 0.0 for k in _STATS}}
    with contextlib.redirect_stdout(io.StringIO()) as log:
        coco_dt = samples.coco.loadRes(results)
        ev = COCOeval(samples.coco, coco_dt, "bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {**metrics, **{k: float(v) for k, v in zip(_STATS, ev.stats)}, "cocoeval": log.getvalue().strip()}
