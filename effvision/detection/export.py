"""A detector to ONNX, parity-checked in onnxruntime: whole (``export_detector``: image ->
boxes, scores, labels, count, with NMS in the graph; RetinaNet and FCOS), or its backbone + neck
alone at one fixed size (``export_backbone``: anchors, heads, decoding and NMS stay in PyTorch).

``ExportedDetector`` runs a whole export (onnxruntime or OpenVINO) as a torchvision-style
detector; ``OnnxBackbone`` puts an exported backbone back into the torchvision detector.
"""
from __future__ import annotations

import logging
import math
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import EffVisionError
from .io import DetectorSpec, load_detector
from .nms import nms_translations
from .parity import match_detections

__all__ = ["export_backbone", "OnnxBackbone", "BACKBONE_ONNX", "export_detector", "ExportedDetector", "DETECTOR_ONNX",
           "quantize_detector", "synthetic_scenes", "reference_detector", "fixed_size_copy"]

BACKBONE_ONNX = "backbone.onnx"


class _Maps(nn.Module):
    """The backbone with a tuple output (ONNX graphs return tensors, not dicts)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.body(x).values())


def default_export_size(spec: DetectorSpec, divisor: int) -> tuple[int, int]:
    if spec.fixed_size:
        return tuple(spec.fixed_size)  # type: ignore[return-value]
    side = math.ceil(spec.min_size / math.lcm(32, divisor)) * math.lcm(32, divisor)
    return side, side


def export_backbone(detector_dir: str | Path, out_dir: str | Path, size: tuple[int, int] | None = None,
                    opset: int = 18, atol: float = 1e-3, dynamic_hw: bool = False) -> dict[str, Any]:
    """detector dir -> out_dir/{backbone.onnx, manifest.json}; refuses to overwrite. With
    ``dynamic_hw`` the graph takes any height and width that are multiples of the backbone's
    divisor (checked at the export size and a second, non-square one)."""
    from effvision.export import OnnxExportConfig, check_parity, export_onnx, write_manifest

    out_dir = Path(out_dir)
    if (out_dir / BACKBONE_ONNX).exists():
        raise EffVisionError(f"{out_dir / BACKBONE_ONNX} exists already; choose another folder (nothing was overwritten)")
    detector, spec = load_detector(detector_dir)
    body = detector.backbone
    h, w = size or default_export_size(spec, body.divisor)
    if h % body.divisor or w % body.divisor or (body.fixed_size and (h, w) != body.fixed_size):
        raise EffVisionError(f"export size {h}x{w} does not fit backbone {body.spec.name} "
                             f"(multiples of {body.divisor}{', only ' + str(body.fixed_size) if body.fixed_size else ''})")
    if dynamic_hw and body.fixed_size:
        raise EffVisionError(f"dynamic_hw: backbone {body.spec.name} only runs at {body.fixed_size}")
    # A dynamic batch axis, since the detector batches its images in one tensor; H, W as asked.
    cfg = OnnxExportConfig(opset=opset, dynamic_batch=True, parity_batch_sizes=[1, 2], atol=atol,
                           dynamic_hw=dynamic_hw, hw_multiple=math.lcm(32, body.divisor))
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _Maps(body).eval()
    path = export_onnx(model, out_dir / BACKBONE_ONNX, (3, h, w), cfg, output_names=body.names)
    try:
        parity = check_parity(model, path, (3, h, w), cfg.parity_batch_sizes, atol, sizes=cfg.parity_sizes((3, h, w)))
    except EffVisionError:
        path.replace(path.with_suffix(".onnx.failed-parity"))  # kept for inspection, never as backbone.onnx
        raise
    with torch.no_grad():
        shapes = [["batch", *m.shape[1:]] for m in model(torch.zeros(1, 3, h, w))]
    hw_names = [f"height (multiple of {cfg.hw_multiple})", f"width (multiple of {cfg.hw_multiple})"]
    if dynamic_hw:
        shapes = [[*s[:2], f"height / {st}", f"width / {st}"] for s, st in zip(shapes, body.strides)]
    info = {
        "format": "onnx", "opset": opset, "part": "backbone+neck", "detector": spec.kind,
        "backbone": spec.backbone["name"], "source": str(detector_dir),
        "input": {"name": "input", "shape": ["batch", 3, *(hw_names if dynamic_hw else (h, w))], "dtype": "float32",
                  "layout": "NCHW",
                  "preprocessing": "the detector's transform: resize to this size, (x/255 - mean) / std",
                  "mean": list(body.spec.mean), "std": list(body.spec.std)},
        "outputs": [{"name": n, "shape": s, "stride": st} for n, s, st in zip(body.names, shapes, body.strides)],
        "parity": parity,
    }
    write_manifest(out_dir, [BACKBONE_ONNX], {**info, **_sparse_section(body)})
    return {"onnx": str(path), "size": [h, w], "dynamic_hw": dynamic_hw, "parity": parity}


class OnnxBackbone(nn.Module):
    """An exported backbone.onnx as a torchvision backbone (onnxruntime, CPU).

    ``detector.backbone = OnnxBackbone(path, detector.backbone.out_channels)``; the detector's
    transform must then produce exactly the exported size (build it with that fixed_size).
    """

    def __init__(self, path: str | Path, out_channels: int) -> None:
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:  # x: (B, 3, H, W)
        outs = self.session.run(None, {self.session.get_inputs()[0].name: x.detach().float().cpu().numpy()})
        return OrderedDict((n, torch.from_numpy(o).to(x.device)) for n, o in zip(self.names, outs))


DETECTOR_ONNX = "detector.onnx"
EXPORT_FORMATS = ("onnx", "openvino", "tensorrt")
PRECISIONS = ("fp32", "int8")
RESIZED_BOX_ATOL, RESIZED_SCORE_ATOL = 1e-2, 1e-3  # end to end, through the graph's Resize (see export_detector)
TRT_TOPK_MAX = 3840  # TensorRT's TopK: K must be less than this (its ONNX op list's restriction)
INT8_OP_TYPES = ["Conv", "MatMul", "Gemm"]  # the dense part; post-processing (NMS, TopK, gathers) stays fp32


def export_detector(detector_dir: str | Path, out_dir: str | Path, *, size: tuple[int, int] | None = None,
                    opset: int = 18, fmt: str = "onnx", precision: str = "fp32", score_thresh: float | None = None,
                    nms_iou: float | None = None, max_detections: int | None = None,
                    images: list[torch.Tensor] | None = None, box_atol: float = 1e-3,
                    score_atol: float = 1e-4) -> dict[str, Any]:
    """The whole detector (image -> boxes, scores, labels, count; ``whole.WholeDetector``) to
    ``out_dir/detector.onnx`` with a manifest; refuses to overwrite. Parity: the detections of
    onnxruntime against the torchvision detector's own (resizing to the same size) on ``images``
    ((3, h, w) floats in [0, 1]; synthetic scenes if None), matched per image: boxes within
    ``box_atol`` pixels of the network's input frame (H, W), scores within ``score_atol``, the
    same labels. ``precision="int8"``:
    onnxruntime static QDQ quantization of the convolutions and matmuls, calibrated on
    ``images`` (real ones required), its agreement with fp32 reported. ``fmt``: "openvino" adds
    model.xml/.bin (checked against onnxruntime), "tensorrt" checks the graph against TensorRT's
    op list and QDQ rules (symmetric int8)."""
    from effvision.export import OnnxExportConfig, ParityError, export_onnx, write_manifest

    from .parity import agreement
    from .whole import OUTPUT_NAMES, WholeDetector, apply_settings, settings_of

    out_dir = Path(out_dir)
    if fmt not in EXPORT_FORMATS:
        raise EffVisionError(f"unknown detector export format '{fmt}' (available: {', '.join(EXPORT_FORMATS)})")
    if precision not in PRECISIONS:
        raise EffVisionError(f"detector export precision '{precision}' is not available: fp32 or int8 (onnxruntime "
                             f"has no fp8 convolutions, and TensorRT's fp16 is a build flag on the fp32 graph)")
    if (out_dir / DETECTOR_ONNX).exists():
        raise EffVisionError(f"{out_dir / DETECTOR_ONNX} exists already; choose another folder (nothing was overwritten)")
    if precision == "int8" and not images:
        raise EffVisionError("int8 detector export needs calibration images (a COCO data folder); none were given")
    detector, spec = load_detector(detector_dir)
    body = detector.backbone
    h, w = size or default_export_size(spec, body.divisor)
    if body.fixed_size and (h, w) != tuple(body.fixed_size):
        raise EffVisionError(f"backbone {body.spec.name} only takes {body.fixed_size[0]}x{body.fixed_size[1]} inputs; "
                             f"it cannot be exported at {h}x{w}")
    if h % body.divisor or w % body.divisor:
        raise EffVisionError(f"export size {h}x{w} does not fit backbone {body.spec.name} (sides must be multiples "
                             f"of {body.divisor})")
    settings = settings_of(detector, score_thresh, nms_iou, max_detections)
    whole = WholeDetector(detector, (h, w), settings).eval()  # refuses a two-stage detector
    if fmt == "tensorrt":
        from effvision.export.tensorrt_check import TRT_OPSETS

        lo, hi = TRT_OPSETS["tensorrt10"]
        if not lo <= opset <= hi:
            raise EffVisionError(f"opset {opset} is outside TensorRT's {lo}..{hi}")
        if max(settings["max_detections"], settings["topk_candidates"]) >= TRT_TOPK_MAX:
            raise EffVisionError(f"TensorRT's TopK takes K < {TRT_TOPK_MAX}: max_detections "
                                 f"{settings['max_detections']}, topk_candidates {settings['topk_candidates']}")
    reference = apply_settings(fixed_size_copy(detector, spec, (h, w)), settings)
    parity_images = images[:16] if images else synthetic_scenes(8)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / DETECTOR_ONNX
    dims = {0: torch.export.Dim("batch", min=1, max=4096), 2: torch.export.Dim("height", min=2, max=8192),
            3: torch.export.Dim("width", min=2, max=8192)}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(whole, Path(tmp) / DETECTOR_ONNX, (3, h + 16, w + 16), OnnxExportConfig(opset=opset),
                           output_names=OUTPUT_NAMES, translations=nms_translations(), input_name="images", dims=dims)
        exported = ExportedDetector(fp32)
        # The network: images already at the export size, so the graph's resize is the identity and
        # any difference is the network's. Then end to end from the images' own sizes: onnxruntime's
        # bilinear Resize rounds its sampling positions differently from torch's interpolate
        # (~1e-6 in pixel values), which the network can amplify to ~1e-3 px in boxes.
        at_size = [F.interpolate(im[None], size=(h, w), mode="bilinear", align_corners=False)[0] for im in parity_images]
        parity = _parity(reference, exported, at_size, (h, w), score_atol, box_atol)
        if not _parity_ok(parity, box_atol, score_atol):
            fp32.replace(out_dir / (DETECTOR_ONNX + ".failed-parity"))  # kept for inspection, never as detector.onnx
            raise ParityError(f"onnxruntime's detections differ from PyTorch's: {_parity_line(parity)}")
        end_to_end = _parity(reference, exported, parity_images, (h, w), RESIZED_SCORE_ATOL, RESIZED_BOX_ATOL)
        if not _parity_ok(end_to_end, RESIZED_BOX_ATOL, RESIZED_SCORE_ATOL):
            fp32.replace(out_dir / (DETECTOR_ONNX + ".failed-parity"))
            raise ParityError(f"onnxruntime's detections differ from PyTorch's on images resized in the graph: "
                              f"{_parity_line(end_to_end)}")
        info: dict[str, Any] = {"precision": precision, "parity_fp32": parity, "parity_fp32_resized": end_to_end}
        if precision == "int8":
            fp32_detections = ExportedDetector(fp32)(parity_images)
            tmp_int8 = Path(tmp) / "int8.onnx"
            info["quantization"] = quantize_detector(fp32, tmp_int8, images, symmetric=fmt == "tensorrt")
            info["int8_vs_fp32"] = agreement(fp32_detections, ExportedDetector(tmp_int8)(parity_images))
            tmp_int8.replace(path)
        else:
            fp32.replace(path)
    files = [DETECTOR_ONNX]
    if fmt == "tensorrt":
        from effvision.export.tensorrt_check import check_tensorrt, op_list_used, raise_if_incompatible

        violations = check_tensorrt(path)
        if violations:
            path.replace(out_dir / (DETECTOR_ONNX + ".failed-tensorrt"))
        raise_if_incompatible(violations, str(path))
        info["tensorrt_check"] = {**op_list_used(), "violations": 0}
    if fmt == "openvino":
        from effvision.export.openvino import OPENVINO_FILES, convert_to_openvino

        xml = convert_to_openvino(path, out_dir)
        # at the export size: both run the same graph, and their Resize ops round apart as above
        ours, theirs = ExportedDetector(path)(at_size), ExportedDetector(xml, runtime="openvino")(at_size)
        if precision == "int8":  # two runtimes' int8 kernels round differently: agreement, reported
            info["openvino_vs_onnxruntime"] = agreement(ours, theirs)
        else:
            report = match_detections(ours, theirs, tie=score_atol, box_tol=box_atol)
            if not _parity_ok(report, box_atol, score_atol):
                raise ParityError(f"OpenVINO's detections differ from onnxruntime's: {_parity_line(report)}")
            info["openvino_vs_onnxruntime"] = report
        files += list(OPENVINO_FILES)
    k = settings["max_detections"]
    write_manifest(out_dir, files, {
        "format": fmt, "opset": opset, "part": "detector", "detector": spec.kind, "backbone": spec.backbone["name"],
        "source": str(detector_dir), "size": [h, w], "postprocess": settings,
        "input": {"name": "images", "shape": ["batch", 3, "height", "width"], "dtype": "float32", "layout": "NCHW",
                  "range": [0.0, 1.0],
                  "preprocessing": f"in the graph: bilinear resize to {h}x{w}, then (x - mean) / std",
                  "mean": list(body.spec.mean), "std": list(body.spec.std)},
        "outputs": [{"name": "boxes", "shape": ["batch", k, 4], "meaning": "x1, y1, x2, y2 in input pixels; 0 in padding"},
                    {"name": "scores", "shape": ["batch", k], "meaning": "best first; 0 in padding"},
                    {"name": "labels", "shape": ["batch", k], "dtype": "int64",
                     "meaning": "1..num_classes-1 (categories below); -1 in padding"},
                    {"name": "count", "shape": ["batch"], "dtype": "int64", "meaning": "detections per image"}],
        "categories": spec.categories, **info, **_sparse_section(body)})
    return {"onnx": str(path), "size": [h, w], "format": fmt, "postprocess": settings, **info}


def reference_detector(detector_dir: str | Path, size: tuple[int, int] | list[int],
                       settings: dict[str, Any]) -> nn.Module:
    """The PyTorch detector an export is checked against: resizing every image to ``size``, with
    the export's post-processing settings."""
    from .whole import apply_settings

    detector, spec = load_detector(detector_dir)
    return apply_settings(fixed_size_copy(detector, spec, (int(size[0]), int(size[1]))), settings)


def fixed_size_copy(detector: nn.Module, spec: DetectorSpec, size: tuple[int, int]) -> nn.Module:
    """The same detector (weights shared) with a transform that resizes every image to ``size``."""
    import copy

    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    t = detector.transform
    ref = copy.copy(detector)  # shallow: the modules (and weights) are the detector's own
    ref._modules = dict(detector._modules)
    ref.transform = GeneralizedRCNNTransform(spec.min_size, spec.max_size, t.image_mean, t.image_std,
                                             size_divisible=1, fixed_size=(size[1], size[0]))  # torchvision's is (W, H)
    return ref.eval()


def _sparse_section(body: nn.Module) -> dict[str, Any]:
    from effvision.attention import export_summary

    sparse = export_summary(body)  # a sparse_attention stage's policies: the export form per kind
    return {} if sparse is None else {"sparse_attention": sparse}


def _parity(reference: nn.Module, exported: nn.Module, images: list[torch.Tensor], size: tuple[int, int],
            score_atol: float, box_atol: float) -> dict[str, Any]:
    """PyTorch's detections against the exported file's on ``images``, box errors in the network's
    input frame (``size``)."""
    with torch.no_grad():
        expected = [reference([im])[0] for im in images]
    scales = [(im.shape[-1] / size[1], im.shape[-2] / size[0]) for im in images]  # input frame -> image pixels
    report = match_detections(expected, exported(images), tie=score_atol, box_tol=box_atol, scales=scales)
    return {**report, "box_atol": box_atol, "score_atol": score_atol}


def _parity_ok(report: dict[str, Any], box_atol: float, score_atol: float) -> bool:
    return (report["unmatched"] == report["unmatched_at_ties"] and report["max_box_error"] <= box_atol
            and report["max_score_error"] <= score_atol)


def _parity_line(report: dict[str, Any]) -> str:
    return (f"{report['unmatched'] - report['unmatched_at_ties']} of {report['detections']} detections unmatched, "
            f"max box error {report['max_box_error']:.2e} px, max score error {report['max_score_error']:.2e}")


def synthetic_scenes(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Flat-coloured rectangles on grey, of assorted sizes: parity inputs where no data is given
    (noise images give near-identical scores everywhere, whose ties hide nothing)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        hh, ww = 96 + 32 * (i % 3), 128 + 48 * (i % 2)
        img = torch.full((3, hh, ww), 0.5)
        for _ in range(6):
            y, x = (int(torch.randint(0, s - 8, (1,), generator=g)) for s in (hh, ww))
            dy, dx = (int(torch.randint(8, s // 2, (1,), generator=g)) for s in (hh, ww))
            img[:, y:y + dy, x:x + dx] = torch.rand(3, 1, 1, generator=g)
        out.append(img)
    return out


def quantize_detector(src: Path, dst: Path, images: list[torch.Tensor], symmetric: bool) -> dict[str, Any]:
    """onnxruntime static quantization, QDQ form: int8 weights per output channel, activations
    per tensor calibrated (min/max) on ``images``; ``symmetric`` (TensorRT) makes activations
    signed int8 with zero point 0, else uint8 (onnxruntime's fastest CPU form, U8S8). The first
    convolution (it sees the normalized image) stays fp32: on the CPU figures' FCOS/resnet10t,
    quantizing it cost 0.027 COCO128 mAP, keeping it 0.002 (percentile calibration, more
    calibration images and fp32 output convs of the heads changed nothing)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(images)

        def get_next(self) -> dict[str, Any] | None:
            im = next(self.items, None)
            return None if im is None else {"images": im[None].float().numpy()}

    model = onnx.load(str(src))
    del model.graph.value_info[:]  # the dynamo graph's value_info trips the quantizer's shape inference
    first = next(n.name for n in model.graph.node if n.op_type == "Conv")  # graph order is topological
    plain = dst.with_name("plain.onnx")
    onnx.save(model, str(plain))
    quiet = logging.getLogger()  # the quantizer logs a pre-processing hint at WARNING on the root logger
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        quantize_static(str(plain), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=INT8_OP_TYPES, per_channel=True, weight_type=QuantType.QInt8,
                        nodes_to_exclude=[first],
                        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                        # TensorRT takes no int32 bias Q/DQ (it quantizes biases itself)
                        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                                       "QuantizeBias": not symmetric})
    finally:
        quiet.setLevel(level)
    plain.unlink()
    nodes = onnx.load(str(dst)).graph.node
    dequantized = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear"}
    dense = [n for n in nodes if n.op_type in INT8_OP_TYPES]
    quantized = sum(1 for n in dense if n.input[0] in dequantized)  # an int8 input: onnxruntime fuses it
    return {"form": "onnxruntime static QDQ", "weights": "int8, per output channel, symmetric",
            "activations": "int8 symmetric" if symmetric else "uint8 asymmetric", "calibration_images": len(images),
            "quantized_ops": quantized, "float_ops": len(dense) - quantized, "kept_fp32": [first]}


class ExportedDetector(nn.Module):
    """An exported whole detector (detector.onnx in onnxruntime, or model.xml in OpenVINO) as a
    torchvision-style detector: ``forward(list of (3, h, w) images in [0, 1])`` -> a list of
    {boxes, scores, labels}, one image per call (images differ in size). ``effvision eval`` and
    the COCO evaluator take it as they take the PyTorch detector."""

    def __init__(self, path: str | Path, runtime: str = "ort", threads: int | None = None) -> None:
        super().__init__()
        path = Path(path)
        if runtime == "openvino":
            from effvision.export.openvino import openvino_session

            compiled = openvino_session(path, threads)
            self._run = lambda x: [compiled(x)[o] for o in compiled.outputs]
        else:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            try:
                session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime's own error types
                raise EffVisionError(f"{path}: onnxruntime cannot load it: {str(e).strip().splitlines()[0]}") from e
            names = [o.name for o in session.get_outputs()]
            if names != ["boxes", "scores", "labels", "count"]:
                raise EffVisionError(f"{path} is not a whole-detector export (outputs {names}; expected boxes, scores, "
                                     f"labels, count)")
            self._run = lambda x: session.run(None, {"images": x})
        self.path, self.runtime = path, runtime

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for im in images:
            boxes, scores, labels, count = self._run(im[None].detach().float().cpu().numpy())
            n = int(count[0])
            out.append({"boxes": torch.from_numpy(boxes[0, :n]), "scores": torch.from_numpy(scores[0, :n]),
                        "labels": torch.from_numpy(labels[0, :n])})
        return out
