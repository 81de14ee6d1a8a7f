"""The ort-cpu target's graph: onnxruntime's transformer optimizer (opt-in fused Attention) with
fp32 parity on the optimized graph, INT8 as onnxruntime's dynamic quantization of that graph
with its SQNR/agreement check, and the manifest's record of both."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch

import effvision.models  # noqa: F401  (registers vit_micro_patch4_32)
from effvision.compress.quantize import QuantConfig, quantize_
from effvision.errors import EffVisionError
from effvision.export import DeployConfig, export_deployable
from effvision.models.io import ModelSpec, create_model, save_model

SPEC = ModelSpec(name="vit_micro_patch4_32", num_classes=10)  # 4 blocks, width 96, 3 heads


def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _model_dir(tmp: Path, quantize: QuantConfig | None = None) -> Path:
    torch.manual_seed(0)
    model = create_model(SPEC).eval()
    d = tmp / ("q" if quantize else "fp32")
    if quantize is not None:
        g = torch.Generator().manual_seed(1)
        calib = [(torch.randn(16, 3, 32, 32, generator=g), None) for _ in range(2)]
        quantize_(model, quantize, calib, progress=False)
    save_model(model, SPEC, d)
    return d


def test_ort_cpu_fp32_is_the_fused_optimized_graph(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    with pytest.raises(EffVisionError, match="needs target ort-cpu"):  # contrib ops are not for TensorRT
        export_deployable(d, tmp_path / "trt", DeployConfig(target="tensorrt", ort_optimize=True))
    assert not (tmp_path / "trt").exists()
    r = export_deployable(d, tmp_path / "out", DeployConfig(target="ort-cpu", ort_optimize=True))
    ops = _ops(tmp_path / "out" / "model.onnx")
    # LayerNorms fused with the residual adds, GELU one op (effvision's export writes the pattern
    # onnxruntime fuses), no Erf left
    assert ops["SkipLayerNormalization"] >= 4 and ops["Erf"] == 0 and ops["Attention"] == 0
    opt = r["checks"]["ort_transformer_optimizer"]
    assert opt["max_abs_error"] <= 1e-4 and r["parity"] is opt  # parity held on the optimized graph itself
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["ort_cpu"]["fused_ops"]["SkipLayerNormalization"] >= 4
    # opt-in: one Attention per block instead of ~15 ops, same parity
    r = export_deployable(d, tmp_path / "fa", DeployConfig(target="ort-cpu", ort_optimize=True,
                                                                          ort_fused_attention=True))
    ops = _ops(tmp_path / "fa" / "model.onnx")
    assert ops["Attention"] == 4 and ops["Softmax"] == 0 and r["parity"]["max_abs_error"] <= 1e-4
    assert r["ort_cpu"]["fused_attention_blocks"] == 4
    # the tensorrt target keeps the standard graph
    export_deployable(d, tmp_path / "std", DeployConfig(target="tensorrt"))
    assert _ops(tmp_path / "std" / "model.onnx")["Attention"] == 0


def test_ort_cpu_int8_is_dynamic_qattention_and_checked(tmp_path: Path) -> None:
    d = _model_dir(tmp_path, QuantConfig(target="ort-cpu", calib_batches=2, min_calib_samples=16))
    r = export_deployable(d, tmp_path / "out", DeployConfig(target="ort-cpu"))
    ops = _ops(tmp_path / "out" / "model.onnx")
    # every Linear as MatMulInteger (qkv, proj, fc1, fc2 of 4 blocks), no QDQ pairs
    assert ops["MatMulInteger"] >= 16 and ops["QuantizeLinear"] == 0
    check = r["checks"]["int8"]
    assert check["sqnr_db_vs_fp32"] >= 15.0 and check["top1_agreement_vs_fp32"] >= 0.5
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["ort_cpu"]["int8"]["form"] == "ort-dynamic"
    assert manifest["parity"]["onnxslim"]["max_abs_error"] <= 1e-4  # the fp32 graph it quantized
    # a model that kept a Linear in float keeps effvision's QDQ form (dynamic would quantize it)
    d2 = _model_dir(tmp_path / "x", QuantConfig(target="ort-cpu", calib_batches=2, min_calib_samples=16,
                                                  exclude=["head"]))
    export_deployable(d2, tmp_path / "out2", DeployConfig(target="ort-cpu"))
    assert _ops(tmp_path / "out2" / "model.onnx")["QuantizeLinear"] > 0
    assert json.loads((tmp_path / "out2" / "manifest.json").read_text())["ort_cpu"]["int8"]["form"] == "qdq"
