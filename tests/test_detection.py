"""Detection: where backbones come from, bad input, COCO checks and mAP, save/load, ONNX split."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

import effvision  # noqa: F401
from effvision.detection import DetectorSpec, backbone, build_detector, build_from_spec, load_detector, save_detector
from effvision.data.coco import CocoDataConfig, check_coco, coco_samples
from effvision.detection.evaluate import evaluate_coco
from effvision.errors import EffVisionError
from effvision.models.io import ModelSpec, create_model, save_model

from conftest import SHARED, needs_shared

COCO128 = SHARED / "datasets" / "coco128"


# ---- backbone sources ---------------------------------------------------------------------

def _saved_vit(directory: Path) -> tuple[nn.Module, ModelSpec]:
    torch.manual_seed(1)
    spec = ModelSpec(name="vit_micro_patch4_32", num_classes=10, img_size=32)
    model = create_model(spec)
    save_model(model, spec, directory)
    return model, spec


def test_backbone_from_model_dir_and_run_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, _ = _saved_vit(run / "02-train" / "model")
    (run / "01-train" / "model").mkdir(parents=True)  # older stage without a model: skipped
    (run / "recipe.yaml").write_text("name: x\n")
    for source in (run / "02-train" / "model", run):
        body = backbone(source, out_channels=32)
        # The trunk carries the saved weights (the first block's qkv), not a fresh init.
        got = dict(body.body.named_parameters())["model.blocks.0.attn.qkv.weight"]
        assert torch.equal(got, model.blocks[0].attn.qkv.weight)
        assert body.plain and body.spec.name == "vit_micro_patch4_32"
    with pytest.raises(EffVisionError, match="holds no model"):
        backbone(tmp_path / "run" / "01-train", out_channels=32)


def test_plain_vit_takes_non_square_sizes_only_with_dynamic_size() -> None:
    # The reason for dynamic_img_size: a 224-trained timm ViT rejects a 320x480 input as built.
    vit = timm.create_model("deit_tiny_patch16_224", depth=1, num_classes=0)
    with pytest.raises(Exception):
        vit.forward_intermediates(torch.rand(1, 3, 320, 480), intermediates_only=True)
    body = backbone(timm.create_model("deit_tiny_patch16_224", depth=1, num_classes=0), out_channels=16)
    maps = body(torch.rand(1, 3, 320, 480))
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(40, 60), (20, 30), (10, 15), (5, 8)]


def test_backbone_bad_input() -> None:
    with pytest.raises(EffVisionError, match="no feature info"):
        backbone(nn.Sequential(nn.Conv2d(3, 8, 3)), out_channels=16)
    with pytest.raises(EffVisionError, match="unknown model 'resnet_nope'"):
        backbone("resnet_nope")
    with pytest.raises(EffVisionError, match="not found"):
        backbone("./no/such/run")
    body = backbone("resnet10t", out_channels=16)
    with pytest.raises(EffVisionError, match="multiples of 32, got 100x96"):
        body(torch.rand(1, 3, 100, 96))
    levit = backbone("levit_128s", out_channels=16)
    assert levit.fixed_size == (224, 224)
    with pytest.raises(EffVisionError, match="takes only 224x224 inputs, got 256x256"):
        levit(torch.rand(1, 3, 256, 256))
    with pytest.raises(EffVisionError, match="takes only"):
        build_detector("fasterrcnn", levit, 3, fixed_size=(256, 256))
    with pytest.raises(EffVisionError, match="unknown detector 'yolo'"):
        build_detector("yolo", body, 3)
    with pytest.raises(EffVisionError, match="not a multiple"):
        build_detector("fasterrcnn", body, 3, fixed_size=(100, 128))
    with pytest.raises(EffVisionError, match="fcos needs out_channels divisible by 32, got 16"):
        build_detector("fcos", body, 3)


# ---- COCO data and mAP ------------------------------------------------------------------

def _coco_copy(tmp_path: Path, edit) -> CocoDataConfig:
    data = json.loads((COCO128 / "annotations" / "instances.json").read_text())
    edit(data)
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return CocoDataConfig(root=str(tmp_path), images=str(COCO128 / "images"), annotations="ann.json")


@needs_shared
def test_coco_bad_entries_error_or_counted_skip(tmp_path: Path) -> None:
    def edit(data):
        data["images"][3]["file_name"] = "missing.jpg"
        ok = [a for a in data["annotations"] if a["image_id"] != data["images"][3]["id"]]
        ok[0]["bbox"] = [10, 10, 0, 5]
        ok[1]["bbox"] = [10, 10, 5, float("nan")]
    cfg = _coco_copy(tmp_path, edit)
    with pytest.raises(EffVisionError, match=r"1 image file\(s\) missing .*missing.jpg.* and 2 degenerate box"):
        check_coco(cfg)
    cfg.on_bad = "skip"
    samples, report = coco_samples(cfg, train=False)
    assert (report.images, report.missing_images, report.degenerate_boxes) == (127, 1, 2)
    assert len(samples) == 127 and len(report.categories) == 80
    image, target = samples[0]
    assert image.dtype == torch.float32 and image.shape[0] == 3 and float(image.max()) <= 1.0
    assert target["boxes"].shape[1] == 4 and target["labels"].min() >= 1 and target["labels"].max() <= 80


@needs_shared
def test_coco_missing_annotations_file(tmp_path: Path) -> None:
    with pytest.raises(EffVisionError, match="COCO annotations not found"):
        check_coco(CocoDataConfig(root=str(COCO128), annotations="nope.json"))
    (tmp_path / "images").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EffVisionError, match="not valid JSON"):
        check_coco(CocoDataConfig(root=str(tmp_path), annotations="bad.json"))


class _Oracle(nn.Module):
    """Returns each image's ground truth as detections (optionally shifted): a known answer
    for COCOeval, which is what is under test here."""

    def __init__(self, samples, shift: float) -> None:
        super().__init__()
        self.targets = {int(samples[i][1]["image_id"]): samples[i][1] for i in range(len(samples))}
        self.order = iter(sorted(self.targets))
        self.shift = shift

    def forward(self, images):
        outs = []
        for _ in images:
            t = self.targets[next(self.order)]
            outs.append({"boxes": t["boxes"] + self.shift, "labels": t["labels"],
                         "scores": torch.ones(len(t["labels"]))})
        return outs


@needs_shared
def test_coco_map_of_known_answers() -> None:
    samples, _ = coco_samples(CocoDataConfig(root=str(COCO128), limit_images=16), train=False)
    perfect = evaluate_coco(_Oracle(samples, 0.0), samples, torch.device("cpu"), progress=False)
    assert perfect["images"] == 16
    assert perfect["bbox_mAP50"] == pytest.approx(1.0) and perfect["bbox_mAP"] > 0.95
    shifted = evaluate_coco(_Oracle(samples, 12.0), samples, torch.device("cpu"), progress=False)
    assert shifted["bbox_mAP"] < perfect["bbox_mAP"] - 0.2


# ---- save/load and the ONNX split --------------------------------------------------------

def _small_detector(kind: str = "fasterrcnn", fixed=None):
    torch.manual_seed(0)
    spec = DetectorSpec(kind=kind, backbone={"name": "resnet10t", "num_classes": 0, "img_size": 224,
                                             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                        num_classes=3, out_channels=32, min_size=128, max_size=160, fixed_size=fixed)
    return build_from_spec(spec).eval(), spec


def test_detector_save_load_round_trip(tmp_path: Path) -> None:
    det, spec = _small_detector("retinanet")
    save_detector(det, spec, tmp_path / "det")
    again, spec2 = load_detector(tmp_path / "det")
    assert spec2 == spec
    x = [torch.rand(3, 120, 150)]
    with torch.no_grad():
        a, b = det(x)[0], again.eval()(x)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    with pytest.raises(EffVisionError, match="no detector in"):
        load_detector(tmp_path)


def test_backbone_onnx_export_runs_inside_the_detector(tmp_path: Path) -> None:
    from effvision.detection.export import BACKBONE_ONNX, OnnxBackbone, export_backbone

    det, spec = _small_detector("fasterrcnn", fixed=[128, 160])
    save_detector(det, spec, tmp_path / "det")
    result = export_backbone(tmp_path / "det", tmp_path / "onnx")
    assert result["size"] == [128, 160] and result["parity"]["max_abs_error"] <= 1e-3
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert [o["name"] for o in manifest["outputs"]] == ["0", "1", "2", "pool"]
    assert [o["stride"] for o in manifest["outputs"]] == [8, 16, 32, 64]
    # The exported part inside torchvision's detector: same detections as all-PyTorch.
    images = [torch.rand(3, 200, 260), torch.rand(3, 90, 120)]
    with torch.no_grad():
        ref = det(images)
        det.backbone = OnnxBackbone(tmp_path / "onnx" / BACKBONE_ONNX, det.backbone.out_channels)
        got = det(images)
    for r, g in zip(ref, got):
        assert len(r["boxes"]) > 0 and r["boxes"].shape == g["boxes"].shape
        torch.testing.assert_close(g["boxes"], r["boxes"], atol=1e-2, rtol=1e-3)
        assert torch.equal(g["labels"], r["labels"])
    with pytest.raises(EffVisionError, match="exists already"):
        export_backbone(tmp_path / "det", tmp_path / "onnx")
    with pytest.raises(EffVisionError, match="does not fit"):
        export_backbone(tmp_path / "det", tmp_path / "onnx2", size=(100, 100))
    shutil.rmtree(tmp_path / "onnx2", ignore_errors=True)


def test_backbone_export_with_dynamic_height_and_width(tmp_path: Path) -> None:
    """A backbone + FPN exported once runs at any size the detector resizes its images to."""
    from effvision.detection.export import export_backbone

    det, spec = _small_detector("fasterrcnn")
    save_detector(det, spec, tmp_path / "det")
    result = export_backbone(tmp_path / "det", tmp_path / "onnx", size=(128, 160), dynamic_hw=True)
    assert result["dynamic_hw"] and result["parity"]["max_abs_error"] <= 1e-3
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert "multiple of" in manifest["input"]["shape"][2]


def test_fcos_boxes_start_one_stride_wide() -> None:
    """torchvision's FCOS init gives box sides ReLU(~0): point boxes with a zero GIoU gradient. On COCO128
    (vit_micro, AdamW 1e-3, 50 warm-up steps) the box ReLU was dead by step 25 and the box loss sat at
    1.0 for 80 epochs: classes right, every box a point, mAP 0. Every side must start well above 0."""
    torch.manual_seed(0)
    trunk = timm.create_model("vit_micro_patch4_32")
    det = build_detector("fcos", backbone(trunk, out_channels=32), 3, min_size=128, max_size=128, fixed_size=(128, 128))
    det.eval().score_thresh = 0.0  # an untrained head scores ~0.01
    with torch.no_grad():
        feats = list(det.backbone(torch.rand(2, 3, 128, 128)).values())
        sides = det.head(feats)["bbox_regression"]  # (B, locations, 4), in stride units
        boxes = det([torch.rand(3, 128, 128)])[0]["boxes"]
    assert sides.min() > 0.5 and sides.max() < 2
    assert len(boxes) and (boxes[:, 2:] - boxes[:, :2]).min() > 1  # no point boxes
