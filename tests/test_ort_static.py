"""Static INT8 for onnxruntime CPU (export/ort_static.py): the calibrated graph runs and its logits
match the fp32 graph's (the independent reference: the fp32 ONNX in onnxruntime) by SQNR, its
ops are the asked form's, and bad calibration input raises one-line errors."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from effvision.export.onnx import OnnxExportConfig, export_onnx
from effvision.export.ort_static import MIN_CALIBRATION_IMAGES, quantize_static_int8

import effvision.models  # noqa: F401  (registers vit_micro_patch4_32)
from effvision.errors import EffVisionError
from effvision.models.io import ModelSpec, create_model

SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def fp32_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = create_model(ModelSpec(name="vit_micro_patch4_32", num_classes=10)).eval()  # 4 blocks, width 96
    return export_onnx(model, tmp_path_factory.mktemp("fp32") / "fp32.onnx", SHAPE, OnnxExportConfig())


def _images(n: int, seed: int) -> np.ndarray:
    # smooth images (a 8x8 field upsampled), not white noise: neighbouring pixels correlate as in photos
    coarse = np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum()))


@pytest.mark.parametrize("form, int8_ops", [("qdq", {"QuantizeLinear", "DequantizeLinear"}),
                                            ("qoperator", {"QLinearMatMul", "QuantizeLinear"})])
def test_static_int8_matches_fp32(fp32_graph: Path, tmp_path: Path, form: str, int8_ops: set[str]) -> None:
    dst = tmp_path / f"{form}.onnx"
    record = quantize_static_int8(fp32_graph, dst, _images(16, seed=0), form=form)
    ops = Counter(n.op_type for n in onnx.load(str(dst)).graph.node)
    assert int8_ops <= set(ops) and record["calibration_images"] == 16
    if form == "qoperator":  # every weight matmul (4 per block) and the attention matmuls (2 per block)
        assert ops["QLinearMatMul"] >= 4 * 6
    x = _images(32, seed=1)  # held out: not the calibration images
    ref, out = _logits(fp32_graph, x), _logits(dst, x)
    assert out.shape == ref.shape
    # a graph with a wrong scale or a dropped op is ~0 dB; INT8 of this model measures ~25-30 dB
    assert _sqnr_db(ref, out) > 15
    assert (ref.argmax(1) == out.argmax(1)).mean() >= 0.75


def test_bad_calibration_raises(fp32_graph: Path, tmp_path: Path) -> None:
    with pytest.raises(EffVisionError, match=r"calibration images are \(3, 16, 16\); the graph takes \(3, 32, 32\)"):
        quantize_static_int8(fp32_graph, tmp_path / "a.onnx", np.zeros((16, 3, 16, 16), np.float32))
    with pytest.raises(EffVisionError, match="4-d input"):
        quantize_static_int8(fp32_graph, tmp_path / "b.onnx", np.zeros((16, 3, 32), np.float32))
    with pytest.raises(EffVisionError, match=f"has 3 images; static INT8 needs at least {MIN_CALIBRATION_IMAGES}"):
        quantize_static_int8(fp32_graph, tmp_path / "c.onnx", _images(3, seed=0))
    with pytest.raises(EffVisionError, match="NaN"):
        quantize_static_int8(fp32_graph, tmp_path / "d.onnx", np.full((8, *SHAPE), np.nan, np.float32))
    with pytest.raises(EffVisionError, match="unknown form 'qlinear'"):
        quantize_static_int8(fp32_graph, tmp_path / "e.onnx", _images(8, seed=0), form="qlinear")
    assert not list(tmp_path.iterdir())  # bad input writes nothing
