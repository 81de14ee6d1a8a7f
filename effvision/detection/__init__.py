"""Detection: any effvision or timm backbone (trained, pruned, compressed) in torchvision's
Faster R-CNN, RetinaNet or FCOS, COCO data and mAP, ONNX export of the backbone + neck."""
from .backbone import DetectionBackbone, SimpleFeaturePyramid, backbone
from .detectors import DETECTORS, anchor_sizes, build_detector
from .io import DetectorSpec, build_from_spec, load_detector, save_detector

__all__ = ["DETECTORS", "DetectionBackbone", "DetectorSpec", "SimpleFeaturePyramid", "anchor_sizes", "backbone",
           "build_detector", "build_from_spec", "load_detector", "save_detector"]
