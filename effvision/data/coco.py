"""COCO-format detection data: torchvision's CocoDetection with transforms v2, after a check
of the annotation file.

The check runs before any training: image files that do not exist and boxes with no area
(width or height <= 0, or not finite) are a clear error, or, with ``on_bad="skip"``,
dropped and counted. Crowd regions (iscrowd=1) are not training targets (as in
torchvision's reference scripts) but stay in the ground truth that COCOeval ignores them by.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from ..errors import ConfigError, EffVisionError

__all__ = ["CocoDataConfig", "CocoReport", "CocoSamples", "check_coco", "coco_samples", "detection_loader"]


@dataclass
class CocoDataConfig:
    root: str = "../shared/datasets/coco128"          # folder holding images/ and annotations/
    images: str = "images"                            # image folder, relative to root
    annotations: str = "annotations/instances.json"   # COCO JSON, relative to root
    on_bad: Literal["error", "skip"] = "error"        # missing images / degenerate boxes
    limit_images: int | None = None                   # only the first N images (by id)
    batch_size: int = 4
    num_workers: int = 0
    hflip: bool = True                                # random horizontal flip in training

    def validate(self, where: str) -> None:
        if self.batch_size <= 0 or self.num_workers < 0:
            raise ConfigError(f"{where}: batch_size must be positive, num_workers non-negative")
        if self.limit_images is not None and self.limit_images <= 0:
            raise ConfigError(f"{where}.limit_images must be positive (or left out)")


@dataclass
class CocoReport:
    images: int = 0                   # images kept
    boxes: int = 0                    # training boxes kept (crowd regions excluded)
    missing_images: int = 0           # skipped: file not found
    degenerate_boxes: int = 0         # skipped: no area or not finite
    categories: list[dict[str, Any]] = field(default_factory=list)  # [{id, name}] in label order 1..K


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EffVisionError(f"COCO annotations not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EffVisionError(f"COCO annotations {path} are not valid JSON: {e}") from e
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise EffVisionError(f"COCO annotations {path} lack the list(s) {', '.join(missing)}")
    return data


def _degenerate(bbox: Any) -> bool:
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        return True
    return not all(math.isfinite(v) for v in bbox) or bbox[2] <= 0 or bbox[3] <= 0


def check_coco(cfg: CocoDataConfig) -> tuple[dict[str, Any], CocoReport]:
    """The annotation dict with bad entries removed (``skip``) and what was found; raises on
    bad entries under ``error``."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise EffVisionError(f"dataset not found: {root}")
    ann_path, image_dir = root / cfg.annotations, root / cfg.images
    if not image_dir.is_dir():
        raise EffVisionError(f"COCO image folder not found: {image_dir}")
    data = _load_json(ann_path)
    images = sorted(data["images"], key=lambda im: im["id"])[: cfg.limit_images]
    missing = [im for im in images if not (image_dir / im["file_name"]).is_file()]
    kept_ids = {im["id"] for im in images} - {im["id"] for im in missing}
    category_ids = {c["id"] for c in data["categories"]}
    anns = [a for a in data["annotations"] if a.get("image_id") in kept_ids]
    unknown = [a for a in anns if a.get("category_id") not in category_ids]
    if unknown:
        raise EffVisionError(f"{ann_path}: annotation {unknown[0].get('id')} has category_id "
                             f"{unknown[0].get('category_id')}, which is not among the categories")
    degenerate = [a for a in anns if _degenerate(a.get("bbox"))]
    if (missing or degenerate) and cfg.on_bad == "error":
        parts = []
        if missing:
            parts.append(f"{len(missing)} image file(s) missing (first: {image_dir / missing[0]['file_name']})")
        if degenerate:
            parts.append(f"{len(degenerate)} degenerate box(es) (first: annotation {degenerate[0].get('id')}, "
                         f"bbox {degenerate[0].get('bbox')})")
        raise EffVisionError(f"{ann_path}: {' and '.join(parts)}; fix the file or set on_bad: skip")
    bad = {id(a) for a in degenerate}
    anns = [a for a in anns if id(a) not in bad]
    categories = sorted(data["categories"], key=lambda c: c["id"])
    clean = {**data, "images": [im for im in images if im["id"] in kept_ids], "annotations": anns,
             "categories": categories}
    report = CocoReport(images=len(kept_ids), boxes=sum(1 for a in anns if not a.get("iscrowd", 0)),
                        missing_images=len(missing), degenerate_boxes=len(degenerate),
                        categories=[{"id": c["id"], "name": c.get("name", str(c["id"]))} for c in categories])
    if not kept_ids:
        raise EffVisionError(f"{ann_path}: no usable image left")
    return clean, report


class CocoSamples(Dataset):
    """(image float (3, H, W) in [0, 1], target {boxes (N, 4) xyxy, labels (N,) in 1..K, image_id})."""

    def __init__(self, cfg: CocoDataConfig, clean: dict[str, Any], train: bool) -> None:
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            base = CocoDetection(str(Path(cfg.root) / cfg.images), str(Path(cfg.root) / cfg.annotations))
            # The checked annotations replace what CocoDetection read (pycocotools' own index build).
            coco = COCO()
            coco.dataset = clean
            coco.createIndex()
        base.coco, base.ids = coco, sorted(coco.imgs)
        self.coco = coco
        self.samples = wrap_dataset_for_transforms_v2(base, target_keys=("image_id", "boxes", "labels", "iscrowd"))
        self.category_ids = [c["id"] for c in clean["categories"]]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}  # 0 is background
        steps: list[Any] = [v2.ToImage()]
        if train and cfg.hflip:
            steps.append(v2.RandomHorizontalFlip())
        steps += [v2.ToDtype(torch.float32, scale=True), v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()]
        self.transform = v2.Compose(steps)
        self.train = train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self.samples[index]
        if "boxes" not in target:  # an image without annotations: empty targets
            h, w = v2.functional.get_size(image)
            target = {"image_id": target["image_id"], "labels": torch.zeros(0, dtype=torch.int64),
                      "iscrowd": torch.zeros(0, dtype=torch.int64),
                      "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w))}
        keep = torch.as_tensor(target["iscrowd"]) == 0
        labels = torch.tensor([self.label_of[int(c)] for c in target["labels"]], dtype=torch.int64)
        boxes = tv_tensors.wrap(target["boxes"][keep], like=target["boxes"])  # indexing drops the box type
        target = {"image_id": target["image_id"], "boxes": boxes, "labels": labels[keep]}
        image, target = self.transform(image, target)
        return image, {"image_id": target["image_id"], "boxes": target["boxes"].as_subclass(torch.Tensor),
                       "labels": target["labels"]}


def coco_samples(cfg: CocoDataConfig, train: bool) -> tuple[CocoSamples, CocoReport]:
    clean, report = check_coco(cfg)
    return CocoSamples(cfg, clean, train), report


def _collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    images, targets = zip(*batch)
    return list(images), list(targets)


def detection_loader(samples: CocoSamples, batch_size: int, shuffle: bool, seed: int = 0,
                     num_workers: int = 0) -> DataLoader:
    return DataLoader(samples, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=_collate, generator=torch.Generator().manual_seed(seed))
