"""Quantization: the qdq op against onnxruntime's QuantizeLinear/DequantizeLinear, PTQ with
each calibrator, fallback, QAT gradients, persistence without pickle, QDQ export for
TensorRT and onnxruntime, the TensorRT checks, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import effvision.models  # noqa: F401  (registers vit_micro_patch4_32)
from effvision.compress.quantize import QuantConfig, QuantLinear, quant_modules, quantize_
from effvision.compress.quantize.qdq_op import qdq
from effvision.errors import EffVisionError
from effvision.export import DeployConfig, check_tensorrt, export_deployable
from effvision.models.io import ModelSpec, create_model, load_model, save_model

from conftest import cli, tiny_recipe

SPEC = ModelSpec(name="vit_micro_patch4_32", num_classes=10)


def _float_model() -> nn.Module:
    torch.manual_seed(0)
    return create_model(SPEC).eval()


def _calib(n: int = 32, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    return [(x[i:i + 16], torch.zeros(len(x[i:i + 16]), dtype=torch.long)) for i in range(0, n, 16)]


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref``, in dB (inf when equal)."""
    return float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean()))


def _int8_grid(t: torch.Tensor, amax: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """``t`` in units of the symmetric int8 step amax / 127 (per channel along ``axis``); after
    fake quantization these are whole numbers in [-128, 127]."""
    step = amax.detach().clamp_min(1e-8) / 127.0
    if axis is not None:
        step = step.reshape([-1 if d == axis else 1 for d in range(t.dim())])
    return t.detach() / step


def _on_grid(units: torch.Tensor) -> bool:
    """Whole int8 steps (``_int8_grid``'s units), up to float rounding."""
    return bool((units - units.round()).abs().max() < 1e-3 and units.min() >= -128.001 and units.max() <= 127.001)


def _quantized_dir(tmp: Path, target: str = "tensorrt", precision: str = "int8") -> Path:
    model = _float_model()
    quantize_(model, QuantConfig(target=target, precision=precision, calib_batches=2, min_calib_samples=8),
              _calib(), progress=False)
    d = tmp / f"q-{target}-{precision}"
    save_model(model, SPEC, d)  # the record the verb left names the quantization
    return d


@pytest.mark.parametrize("zp_dtype,onnx_type", [(torch.int8, TensorProto.INT8), (torch.uint8, TensorProto.UINT8),
                                               (torch.float8_e4m3fn, TensorProto.FLOAT8E4M3FN)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_qdq_matches_onnxruntime_bit_exactly(zp_dtype, onnx_type, per_channel) -> None:
    """Packing ops are bit-exact (style.md): rounding half to even, saturation, fp8 casts."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 3, generator=g) * 4
    x[0, 0, 0], x[0, 0, 1] = 0.25, 0.75  # exact .5 ties after scaling by 1/0.5
    scale = torch.rand(7, generator=g) + 0.1 if per_channel else torch.tensor(0.5)
    zero = torch.full(scale.shape, 128 if zp_dtype == torch.uint8 else 0).to(zp_dtype)
    ref = qdq(x, scale, zero, 1)
    inits = [numpy_helper.from_array(scale.numpy(), "s"),
             helper.make_tensor("z", onnx_type, list(scale.shape),
                                [int(v) for v in zero.to(torch.int32).flatten()] if onnx_type != TensorProto.FLOAT8E4M3FN
                                else [0.0] * zero.numel())]
    graph = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1),
                               helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    out = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x.numpy()})[0]
    np.testing.assert_array_equal(out, ref.numpy())


@pytest.mark.parametrize("method", ["max", "percentile", "mse"])
def test_ptq_int8_stays_close_to_float(method: str) -> None:
    model, ref_model = _float_model(), _float_model()
    report = quantize_(model, QuantConfig(calib_method=method, calib_batches=2, min_calib_samples=8), _calib(),
                       progress=False)
    n_linear = sum(isinstance(m, nn.Linear) for m in ref_model.modules())
    assert len(report.quantized) == n_linear + 1  # every Linear and the patch-embedding Conv2d
    x = _calib(16, seed=7)[0][0]
    qkv = model.blocks[0].attn.qkv
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    qkv.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        ref, out = ref_model(x), model(x)
    # lossy numerics: an SQNR floor, and a ceiling (int8 of a whole ViT lands near 33 dB; a float
    # model passed through unchanged would be infinite)
    assert 20 < _sqnr(ref, out) < 50, f"int8 ({method}) SQNR {_sqnr(ref, out):.1f} dB"
    assert qkv.weight_quantizer.axis == 0 and qkv.weight_quantizer.amax.shape == (qkv.out_features,)
    assert qkv.input_quantizer.amax.dim() == 0 and float(qkv.input_quantizer.amax) > 0
    # qkv computes on the int8 grid: its output is the float linear of its input and weight each
    # rounded to whole steps of amax / 127 (per tensor; per output channel), rebuilt here by hand
    ((inp, got),) = seen
    w_units = _int8_grid(qkv.weight, qkv.weight_quantizer.amax, axis=0).round().clamp(-128, 127)
    x_units = _int8_grid(inp, qkv.input_quantizer.amax).round().clamp(-128, 127)
    want = nn.functional.linear(x_units * float(qkv.input_quantizer.amax) / 127.0,
                                w_units * qkv.weight_quantizer.amax[:, None] / 127.0, qkv.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, nn.functional.linear(inp, qkv.weight, qkv.bias), rtol=1e-5, atol=1e-5)


def test_percentile_and_mse_clip_below_max() -> None:
    amax = {}
    for method in ("max", "percentile", "mse"):
        model = _float_model()
        quantize_(model, QuantConfig(calib_method=method, percentile=99.0, calib_batches=2, min_calib_samples=8),
                  _calib(), progress=False)
        amax[method] = float(model.blocks[0].mlp.fc2.input_quantizer.amax)
    assert amax["percentile"] < amax["max"] and amax["mse"] <= amax["max"]


def test_fallback_meets_the_budget() -> None:
    model, ref = _float_model(), _float_model()
    calib = _calib(64)
    with torch.no_grad():  # labels = the float model's own predictions: float top-1 is 100
        val = [(x, ref(x).argmax(1)) for x, _ in calib]
    # a harsh calibration (clip at the median) makes int8 lose accuracy, so layers must fall back
    report = quantize_(model, QuantConfig(calib_method="percentile", percentile=60.0, calib_batches=4,
                                          min_calib_samples=8, accuracy_budget=0.0), calib, val, progress=False)
    assert report.float_top1 == 100.0 and report.fallback
    assert report.float_top1 - report.quant_top1 <= 0.0
    mods = dict(model.named_modules())
    assert all(type(mods[n]) is nn.Linear or type(mods[n]) is nn.Conv2d for n in report.fallback)
    assert set(report.fallback).isdisjoint(quant_modules(model))
    assert set(report.sensitivity) >= set(report.fallback)


@pytest.mark.parametrize("learnable", [False, True])
def test_qat_gradients_flow_straight_through(learnable: bool) -> None:
    model = _float_model()
    quantize_(model, QuantConfig(calib_batches=2, min_calib_samples=8, learnable_scales=learnable), _calib(),
              progress=False)
    model.train()
    x, y = _calib(16)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    fc = model.blocks[0].mlp.fc1
    assert fc.weight.grad is not None and fc.weight.grad.abs().sum() > 0
    assert isinstance(fc.input_quantizer.amax, nn.Parameter) == learnable
    if learnable:
        assert fc.input_quantizer.amax.grad is not None
    model.eval()
    with torch.no_grad():  # train-mode (aten STE ops) and eval-mode (qdq) forwards agree
        q = fc.input_quantizer
        t = torch.randn(4, 96)
        q.train()
        a = q(t)
        q.eval()
        torch.testing.assert_close(a, q(t))
    # and both really round: whole int8 steps, not the input passed through
    assert _on_grid(_int8_grid(a, q.amax)) and not torch.equal(a, t)


def test_quantized_model_round_trips_without_pickle(tmp_path: Path) -> None:
    d = _quantized_dir(tmp_path)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.json", "model.safetensors"]
    (entry,) = json.loads((d / "model.json").read_text())["modes"]
    assert entry["mode"] == "quantize" and entry["config"]["precision"] == "int8"
    assert "blocks.0.attn.qkv" in entry["metadata"]["modules"]
    model, _ = load_model(d)
    assert isinstance(model.blocks[0].attn.qkv, QuantLinear)
    x = _calib(8)[0][0]
    from safetensors.torch import load_file

    state = load_file(str(d / "model.safetensors"))
    assert "blocks.0.attn.qkv.input_quantizer.amax" in state
    torch.testing.assert_close(model.blocks[0].attn.qkv.input_quantizer.amax,
                               state["blocks.0.attn.qkv.input_quantizer.amax"])
    with torch.no_grad():  # the reloaded model still quantizes: near the float model, not equal to it
        assert 20 < _sqnr(_float_model()(x), model(x)) < 50


def _qdq_nodes(path: Path) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto], list[onnx.NodeProto]]:
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    return m, inits, [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def test_tensorrt_int8_export(tmp_path: Path) -> None:
    d = _quantized_dir(tmp_path)
    r = export_deployable(d, tmp_path / "out", DeployConfig(target="tensorrt"))
    out = tmp_path / "out"
    m, inits, qdq_nodes = _qdq_nodes(out / "model.onnx")
    assert qdq_nodes and check_tensorrt(m) == []
    zps = [inits[n.input[2]] for n in qdq_nodes]
    assert all(z.data_type == TensorProto.INT8 and not numpy_helper.to_array(z).any() for z in zps)
    per_channel = [n for n in qdq_nodes if len(inits[n.input[1]].dims) == 1]
    assert per_channel and all(next(a.i for a in n.attribute if a.name == "axis") == 0 for n in per_channel)
    assert r["checks"]["export"]["top1_agreement"] == 1.0 and "onnxslim" in r["checks"]
    assert r["parity"]["max_rel_error"] <= 0.05
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["quantization"]["target"] == "tensorrt"
    # which TensorRT op list the check used is on record
    assert manifest["tensorrt_check"]["op_list_tensorrt"] == "10.15" and manifest["tensorrt_check"]["opsets"] == [9, 24]
    from effvision.export import sha256

    assert manifest["files"]["model.onnx"]["sha256"] == sha256(out / "model.onnx")


def test_ort_cpu_export_uses_uint8_activations(tmp_path: Path) -> None:
    d = _quantized_dir(tmp_path, target="ort-cpu")
    # the QDQ form (OpenVINO reads it; the default ort-cpu INT8 graph is onnxruntime's dynamic form)
    export_deployable(d, tmp_path / "out", DeployConfig(target="ort-cpu", ort_int8_form="qdq"))
    m, inits, qdq_nodes = _qdq_nodes(tmp_path / "out" / "model.onnx")
    types = {inits[n.input[2]].data_type for n in qdq_nodes}
    assert TensorProto.UINT8 in types and TensorProto.INT8 in types  # uint8 activations, int8 weights
    problems = check_tensorrt(m)  # and TensorRT would reject it, naming the nodes
    assert problems and all("INT8 or FP8" in p.problem or "zero point" in p.problem for p in problems)
    assert all(p.node for p in problems)


def test_fp8_export_and_opset_check(tmp_path: Path) -> None:
    d = _quantized_dir(tmp_path, precision="fp8")
    with pytest.raises(EffVisionError, match="opset 18 is too low for FP8"):
        export_deployable(d, tmp_path / "low", DeployConfig(opset=18))
    assert not (tmp_path / "low").exists()  # nothing written
    export_deployable(d, tmp_path / "out", DeployConfig(opset=19))
    _, inits, qdq_nodes = _qdq_nodes(tmp_path / "out" / "model.onnx")
    assert {inits[n.input[2]].data_type for n in qdq_nodes} == {TensorProto.FLOAT8E4M3FN}


def test_bad_input_errors_before_files(tmp_path: Path) -> None:
    model = _float_model()
    with pytest.raises(EffVisionError, match="calibration set is empty"):
        quantize_(model, QuantConfig(), [], progress=False)
    with pytest.raises(EffVisionError, match="too small: 16 images"):
        quantize_(model, QuantConfig(min_calib_samples=32), _calib(16), progress=False)
    assert not quant_modules(model)  # untouched
    d = _quantized_dir(tmp_path, target="ort-cpu")
    with pytest.raises(EffVisionError, match="quantized for target 'ort-cpu'"):
        export_deployable(d, tmp_path / "out", DeployConfig(target="tensorrt"))
    assert not (tmp_path / "out").exists()


def test_tensorrt_check_names_unsupported_nodes() -> None:
    # what onnxruntime's quantize_dynamic writes: TensorRT has no DynamicQuantizeLinear
    graph = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"], name="dyn_q")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [4])])
    problems = check_tensorrt(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), "jetpack5")
    assert {p.node for p in problems} == {"dyn_q", "<graph>"}  # the op, and opset 18 > 17 for TensorRT 8.5


def test_recipe_quantize_export_and_tensorrt_script(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "r.yaml", stages=[
        {"type": "train", "epochs": 2, "optimizer": {"name": "adamw", "lr": 2.0e-3}, "log_every": 4},
        {"type": "quantize", "calib_batches": 2, "val_batches": 2, "qat_epochs": 1, "qat_lr": 1e-4},
        {"type": "export"}])
    run = tmp_path / "run"
    p = cli("run", str(recipe), "--out", str(run))
    assert p.returncode == 0, p.stderr
    summary = json.loads((run / "02-quantize" / "summary.json").read_text())
    assert summary["quantized_layers"] > 0 and "qat" in summary and abs(summary["top1_drop"]) < 10
    assert json.loads((run / "03-export" / "manifest.json").read_text())["precision"] == "int8"
    p = cli("export", str(run), "--format", "tensorrt", "--profile", "1,8,32", "--out", str(tmp_path / "trt"))
    assert p.returncode == 0, p.stderr
    script = (tmp_path / "trt" / "build_engine.sh").read_text()
    assert "trtexec --onnx=model.onnx" in script and "--stronglyTyped" in script
    assert "--minShapes=input:1x3x32x32" in script and "--maxShapes=input:32x3x32x32" in script
    bad = cli("export", str(run), "--format", "tensorrt", "--profile", "8,1", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "--profile" in bad.stderr and not (tmp_path / "bad").exists()
    # the float model before the quantize stage, as fp16 for TensorRT
    p = cli("export", str(run / "01-train" / "model"), "--precision", "fp16", "--out", str(tmp_path / "fp16"))
    assert p.returncode == 0, p.stderr
    manifest = json.loads((tmp_path / "fp16" / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["parity"]["export"]["max_rel_error"] <= 0.01
    graph = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    assert check_tensorrt(graph) == [] and any(i.data_type == TensorProto.FLOAT16 for i in graph.graph.initializer)
