"""The whole detector as one graph: image -> boxes, scores, labels, count, with NMS in the graph.

The reference is torchvision's own detector (its postprocess and batched_nms), resizing every
image to the export size; detections are matched per image (scores that tie may swap places)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import SHARED, cli, needs_shared

from effvision.detection import DetectorSpec, backbone, build_detector, save_detector
from effvision.detection.export import (DETECTOR_ONNX, ExportedDetector, export_detector, reference_detector,
                                        synthetic_scenes)
from effvision.detection.nms import class_nms, nms_translations
from effvision.detection.parity import match_detections
from effvision.detection.whole import WholeDetector, apply_settings, settings_of
from effvision.errors import EffVisionError
from effvision.export import OnnxExportConfig, export_onnx
from effvision.models.io import ModelSpec

COCO128 = SHARED / "datasets" / "coco128"
SIZE = (96, 128)


def _detector(kind: str, num_classes: int = 5) -> tuple[torch.nn.Module, DetectorSpec]:
    """A random-init detector whose scores differ across locations (torchvision's prior bias makes
    every RetinaNet score ~0.01, and near-equal scores test nothing)."""
    torch.manual_seed(0)
    trunk_spec = ModelSpec(name="resnet10t", num_classes=0)
    import timm

    body = backbone(timm.create_model("resnet10t", num_classes=0), spec=trunk_spec, out_channels=32)
    det = build_detector(kind, body, num_classes, min_size=96, max_size=160)
    cls = det.head.classification_head.cls_logits
    torch.nn.init.normal_(cls.weight, std=0.3)
    torch.nn.init.constant_(cls.bias, -2.0)
    spec = DetectorSpec(kind=kind, backbone=dataclasses.asdict(trunk_spec), num_classes=num_classes, out_channels=32,
                        min_size=96, max_size=160)
    return det.eval(), spec


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for kind in ("fcos", "retinanet"):
        det, spec = _detector(kind)
        out[kind] = save_detector(det, spec, tmp_path_factory.mktemp(kind) / "detector")
    return out


def _check(report: dict) -> None:
    assert report["detections"] > 0
    assert report["unmatched"] == report["unmatched_at_ties"], report
    assert report["max_box_error"] <= 1e-3 and report["max_score_error"] <= 1e-4, report


@pytest.mark.parametrize("kind", ["fcos", "retinanet"])
def test_whole_detector_matches_torchvision_postprocess(kind: str) -> None:
    det, spec = _detector(kind)
    settings = settings_of(det)
    ref = reference_detector_from(det, spec, settings)
    whole = WholeDetector(det, SIZE, settings).eval()
    images = synthetic_scenes(4)
    with torch.no_grad():
        expected = [ref([im])[0] for im in images]
        got = ExportedLike(whole)(images)
    _check(match_detections(expected, got))


def reference_detector_from(det: torch.nn.Module, spec: DetectorSpec, settings: dict) -> torch.nn.Module:
    from effvision.detection.export import fixed_size_copy

    return apply_settings(fixed_size_copy(det, spec, SIZE), settings)


class ExportedLike:
    """A WholeDetector in PyTorch, called like ExportedDetector (one image per call)."""

    def __init__(self, whole: torch.nn.Module) -> None:
        self.whole = whole

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for im in images:
            boxes, scores, labels, count = self.whole(im[None])
            n = int(count[0])
            out.append({"boxes": boxes[0, :n], "scores": scores[0, :n], "labels": labels[0, :n]})
        return out


def test_class_nms_matches_batched_nms_and_its_onnx_form(tmp_path: Path) -> None:
    """The op against torchvision's batched_nms per image (an independent loop), then its ONNX
    translation (NonMaxSuppression + ScatterND) in onnxruntime against the op."""
    from torchvision.ops import batched_nms

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 60, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 5 + torch.rand(2, 60, 2, generator=g) * 30], dim=-1)  # (B, N, 4)
    scores = torch.rand(2, 3, 60, generator=g)                                          # (B, C, N)
    keep = class_nms(boxes, scores, 0.5, 0.3, 4)
    for b in range(2):
        pairs = [(c, n) for c in range(3) for n in range(60) if scores[b, c, n] > 0.3]
        cs, ns = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
        kept = batched_nms(boxes[b, ns], scores[b, cs, ns], cs, 0.5)
        expected = torch.zeros(3, 60)
        for c in range(3):
            for i in [int(k) for k in kept if cs[k] == c][:4]:
                expected[c, ns[i]] = 1.0
        assert torch.equal(keep[b], expected)

    class Nms(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, 4 + C)
            return class_nms(x[..., :4], x[..., 4:].transpose(1, 2), 0.5, 0.3, 4)

    import onnxruntime as ort

    path = export_onnx(Nms(), tmp_path / "nms.onnx", (60, 7), OnnxExportConfig(), output_names=["keep"],
                       translations=nms_translations(), dims={0: torch.export.Dim("batch", min=1, max=64)})
    assert "NonMaxSuppression" in {n.op_type for n in onnx.load(str(path)).graph.node}
    x = torch.cat([boxes, scores.transpose(1, 2)], dim=-1)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert np.array_equal(got, keep.numpy())


@pytest.mark.parametrize("kind", ["fcos", "retinanet"])
def test_exported_detector_matches_pytorch_any_batch_and_size(kind: str, saved: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = export_detector(saved[kind], out, size=SIZE, max_detections=50)
    _check(result["parity_fp32"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["part"] == "detector" and manifest["size"] == list(SIZE)
    assert [o["name"] for o in manifest["outputs"]] == ["boxes", "scores", "labels", "count"]
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / DETECTOR_ONNX), providers=["CPUExecutionProvider"])
    images = synthetic_scenes(3, seed=5)
    same = torch.stack([im[:, :96, :128] for im in images])  # one batch of one size
    boxes, scores, labels, count = session.run(None, {"images": same.numpy()})
    assert boxes.shape == (3, 50, 4) and scores.shape == labels.shape == (3, 50) and count.shape == (3,)
    for b in range(3):  # batched = one by one; padding past count
        one = session.run(None, {"images": same[b:b + 1].numpy()})
        n = int(count[b])
        assert n == int(one[3][0]) and np.allclose(boxes[b, :n], one[0][0, :n], atol=1e-4)
        assert (labels[b, n:] == -1).all() and (scores[b, n:] == 0).all() and (boxes[b, n:] == 0).all()
    # the reference at another image size: boxes come back in the input's own pixels
    ref = reference_detector(saved[kind], SIZE, result["postprocess"])
    with torch.no_grad():
        expected = [ref([im])[0] for im in images]
    _check(match_detections(expected, ExportedDetector(out / DETECTOR_ONNX)(images)))


def test_int8_tensorrt_form_follows_its_rules(saved: dict[str, Path], tmp_path: Path) -> None:
    from effvision.export.tensorrt_check import check_tensorrt

    result = export_detector(saved["fcos"], tmp_path / "int8", size=SIZE, fmt="tensorrt", precision="int8",
                             images=synthetic_scenes(8, seed=2))
    path = tmp_path / "int8" / DETECTOR_ONNX
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"NonMaxSuppression", "QuantizeLinear", "DequantizeLinear", "TopK"} <= ops
    assert check_tensorrt(path) == []   # symmetric int8, zero points 0, no int32 bias Q/DQ
    assert result["quantization"]["quantized_ops"] > 10 and result["int8_vs_fp32"]["detections"] > 0


def test_openvino_runs_the_same_graph(saved: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    result = export_detector(saved["retinanet"], tmp_path / "ov", size=SIZE, fmt="openvino")
    _check(result["openvino_vs_onnxruntime"])
    assert (tmp_path / "ov" / "model.xml").is_file()


def test_bad_input_is_one_line_and_overwrites_nothing(saved: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(EffVisionError, match=r"NMS IoU threshold must be in \(0, 1\)"):
        export_detector(saved["fcos"], tmp_path / "a", nms_iou=1.0)
    with pytest.raises(EffVisionError, match="max detections per image must be at least 1"):
        export_detector(saved["fcos"], tmp_path / "a", max_detections=0)
    with pytest.raises(EffVisionError, match="multiples of 32"):
        export_detector(saved["fcos"], tmp_path / "a", size=(100, 128))
    with pytest.raises(EffVisionError, match="TopK takes K < 3840"):
        export_detector(saved["fcos"], tmp_path / "a", fmt="tensorrt", max_detections=4000)
    with pytest.raises(EffVisionError, match="needs calibration images"):
        export_detector(saved["fcos"], tmp_path / "a", precision="int8")
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / DETECTOR_ONNX).write_text("keep me")
    with pytest.raises(EffVisionError, match="exists already"):
        export_detector(saved["fcos"], tmp_path / "b")
    assert (tmp_path / "b" / DETECTOR_ONNX).read_text() == "keep me"
    frcnn = build_detector("fasterrcnn", backbone("resnet10t", out_channels=32), 3)
    with pytest.raises(EffVisionError, match="covers retinanet and fcos"):
        WholeDetector(frcnn, SIZE, {"score_thresh": 0.05, "nms_iou": 0.5, "max_detections": 10,
                                    "topk_candidates": 100})
    p = cli("export", str(saved["fcos"]), "--out", str(tmp_path / "c"), "--nms-iou", "0")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "nms_iou" in p.stderr


@needs_shared
@pytest.mark.slow
def test_coco128_recipe_exports_whole_then_eval_and_bench_take_it(tmp_path: Path) -> None:
    """train_detection (a few steps) -> export_detection with data: parity and mAP on COCO128
    images; then `effvision eval` and `effvision bench` on the exported folder."""
    import yaml

    data = {"root": str(COCO128), "limit_images": 8, "batch_size": 4, "hflip": False}
    recipe = {"name": "whole", "seed": 0, "device": "cpu", "model": {"name": "resnet10t"},
              "stages": [{"type": "train_detection", "detector": "fcos", "out_channels": 32, "data": data,
                          "min_size": 96, "max_size": 128, "fixed_size": [96, 128], "epochs": 2,
                          "warmup_steps": 1, "optimizer": {"name": "adamw", "lr": 1e-3}},
                         {"type": "export_detection", "data": data, "score_thresh": 0.05}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    p = cli("run", str(tmp_path / "r.yaml"), "--out", str(run))
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads((run / "02-export_detection" / "summary.json").read_text())
    _check(summary["parity_fp32"])
    assert summary["parity_fp32"]["images"] == 8 and abs(summary["map"]["difference"]) <= 0.005
    exported = run / "02-export_detection"
    p = cli("eval", str(exported), "--data", str(COCO128), "--limit-images", "8")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["bbox_mAP"] == pytest.approx(summary["map"]["exported"], abs=1e-9)
    p = cli("bench", str(exported), "--backend", "ort", "--batch-size", "2", "--warmup", "1", "--iters", "2")
    assert p.returncode == 0 and "batch    2" in p.stdout, p.stderr[-2000:]
    p = cli("eval", str(exported))
    assert p.returncode == 2 and "needs --data" in p.stderr


@needs_shared
@pytest.mark.slow
def test_gpu_bench_section_runs_at_toy_size(tmp_path: Path) -> None:
    """The detection_compressed gpu_bench section on the CPU at toy size: its recipe (train, prune,
    distilled fine-tune, INT8 whole export) runs and every row has its figures (the GPU timings
    are left out on the CPU)."""
    import argparse

    from effvision.detection.gpu_section import detection_compressed_markdown, detection_compressed_section

    args = argparse.Namespace(toy=True, coco=str(COCO128), runs=str(tmp_path / "runs"), stamp="t", deadline=None)
    rows = detection_compressed_section(args)
    assert [r["detector"] for r in rows] == ["dense", "pruned 0.5", "pruned 0.5 int8"], rows
    assert rows[1]["params_m"] < rows[0]["params_m"] and all(r["ort_cpu_ms_b1"] > 0 for r in rows)
    assert all(0.0 <= r["bbox_mAP"] <= 1.0 for r in rows)
    assert "| pruned 0.5 int8 | resnet10t | 96x96 |" in "\n".join(detection_compressed_markdown(rows))


def test_token_reduced_backbone_is_refused_with_the_reason() -> None:
    """ToMe drops tokens block by block: the ViTDet pyramid would get a partial grid. The refusal
    names the mode and why (a plain ViT without the mode is accepted)."""
    import timm

    from effvision.dynamic.reduce import TokenReduceConfig, convert_reduced

    import effvision.models  # noqa: F401  (registers vit_micro_patch4_32)

    spec = ModelSpec(name="vit_micro_patch4_32", num_classes=0, img_size=32)
    backbone(timm.create_model("vit_micro_patch4_32", num_classes=0), spec=spec, out_channels=32)
    model = timm.create_model("vit_micro_patch4_32", num_classes=0)
    convert_reduced(model, TokenReduceConfig(method="tome", r=4), None)
    with pytest.raises(EffVisionError, match="went through reduce_tokens.*full token grid"):
        backbone(model, spec=spec, out_channels=32)
