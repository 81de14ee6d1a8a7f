"""int8_layers: measured: block grouping, dropping a group's Q/DQ pairs from the QDQ graph (the
variant must compute what the PyTorch model computes with that group in float), bad config,
and the quantize stage end to end in onnxruntime: every group judged and recorded, float
groups back to plain layers, and the export of the result passing its parity check."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import effvision.models  # noqa: F401  (registers vit_micro_patch4_32)
from effvision.compress.quantize import QuantConfig, quant_modules, quantize_
from effvision.compress.quantize.measured import decide, drop_qdq, group_modules, resolve_runtime
from effvision.compress.quantize.qdq_op import onnx_translations
from effvision.errors import ConfigError, EffVisionError
from effvision.export import OnnxExportConfig, export_onnx
from effvision.export.tensorrt_engine import tensorrt_available
from effvision.export.tensorrt_runtime import graph_precision
from effvision.models.io import ModelSpec, create_model

from conftest import cli, tiny_recipe


def test_groups_are_blocks_and_stable() -> None:
    names = ["head", "blocks.1.mlp.fc1", "blocks.0.attn.qkv", "patch_embed.proj", "blocks.0.mlp.fc2",
             "stages.1.blocks.0.conv_pw"]
    assert group_modules(names, "block") == {
        "blocks.0": ["blocks.0.attn.qkv", "blocks.0.mlp.fc2"], "blocks.1": ["blocks.1.mlp.fc1"], "head": ["head"],
        "patch_embed.proj": ["patch_embed.proj"], "stages.1.blocks.0": ["stages.1.blocks.0.conv_pw"]}
    assert list(group_modules(names, "layer")) == sorted(names)
    # INT8 only where it won at least min_wins of the rounds; a coin toss stays float
    assert decide({"a": 0.8, "b": 0.6, "c": 0.0}, 0.8) == {"a": True, "b": False, "c": False}


def test_drop_qdq_matches_the_model_with_that_group_in_float(tmp_path: Path) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = create_model(ModelSpec(name="vit_micro_patch4_32", kwargs={"depth": 2})).eval()
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    quantize_(model, QuantConfig(target="ort-cpu", calib_batches=2, min_calib_samples=16),
              [(x[:16], None), (x[16:], None)], progress=False)
    full = onnx.load(str(export_onnx(model, tmp_path / "q.onnx", (3, 32, 32), OnnxExportConfig(),
                                     translations=onnx_translations(18))))
    assert graph_precision(tmp_path / "q.onnx") == "int8"  # the engine parity floor it would be held to
    group = [n for n in quant_modules(model) if n.startswith("blocks.0.")]
    variant = drop_qdq(full, set(group))
    count = lambda m: sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)  # noqa: E731
    assert count(full) - count(variant) == 4 * len(group)  # input and weight Q/DQ pair per layer
    onnx.checker.check_model(variant)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # Q/DQ as written
    out = ort.InferenceSession(variant.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {"input": x[:8].numpy()})[0]
    mods = quant_modules(model)
    for n in group:
        mods[n].input_quantizer.enabled = mods[n].weight_quantizer.enabled = False
    with torch.no_grad():
        ref = model(x[:8]).numpy()
    # same tolerance as the QDQ export's parity (a value on a rounding edge moves one int8 step)
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 0.05
    with pytest.raises(EffVisionError, match="does not name the Q/DQ nodes"):
        drop_qdq(full, {"no.such.layer"})


def test_bad_measure_config() -> None:
    with pytest.raises(ConfigError, match="int8_rounds >= 3"):
        QuantConfig(int8_layers="measured", int8_rounds=2).validate("stages.quantize")
    with pytest.raises(ConfigError, match="fp8 is measured on TensorRT"):
        QuantConfig(precision="fp8", int8_layers="measured", int8_runtime="onnxruntime").validate("q")
    assert resolve_runtime(QuantConfig(target="ort-cpu", int8_layers="measured")) == "onnxruntime"
    if not tensorrt_available():
        with pytest.raises(EffVisionError, match="int8_runtime: tensorrt: the tensorrt Python package"):
            resolve_runtime(QuantConfig(int8_layers="measured", int8_runtime="tensorrt"))


def test_quantize_stage_measured_end_to_end(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "r.yaml", model={"kwargs": {"depth": 2}}, stages=[
        {"type": "train", "epochs": 1, "optimizer": {"name": "adamw", "lr": 2.0e-3}, "log_every": 4},
        {"type": "quantize", "target": "ort-cpu", "calib_batches": 2, "val_batches": 1, "int8_layers": "measured",
         "int8_rounds": 5, "int8_batch_size": 4},
        {"type": "export"}])
    run = tmp_path / "run"
    p = cli("run", str(recipe), "--out", str(run))
    assert p.returncode == 0, p.stderr
    quant = json.loads((run / "02-quantize" / "model" / "model.json").read_text())["modes"][-1]
    assert quant["mode"] == "quantize"
    quant = quant["metadata"]
    record = quant["int8_layers"]
    assert record["mode"] == "measured" and record["runtime"].startswith("onnxruntime")
    groups = record["groups"]
    assert set(groups) == {"patch_embed.proj", "blocks.0", "blocks.1", "head"}
    for g in groups.values():
        assert g["int8_speedup"] > 0 and g["int8_speedup_quartiles"][0] <= g["int8_speedup_quartiles"][1]
        assert 0.0 <= g["int8_wins"] <= 1.0
    int8 = {g for g, r in groups.items() if r["int8"]}
    if record["final"]["chosen"] == "measured":  # the per-group verdicts stood: they follow the wins rule
        assert int8 == {g for g, r in groups.items() if r["int8_wins"] >= record["min_wins"]}
    # the model dir holds exactly the INT8 groups' layers, and the export agrees with it
    assert sorted(quant["modules"]) == sorted(m for g in int8 for m in groups[g]["modules"])
    manifest = json.loads((run / "03-export" / "manifest.json").read_text())
    assert manifest["quantization"]["int8_layers"]["groups"] == groups
    ops = [n.op_type for n in onnx.load(str(run / "03-export" / "model.onnx")).graph.node]
    # Which INT8 form the export wrote depends on what the timing chose: every Linear INT8 gives
    # onnxruntime's dynamic form (one MatMulInteger per Linear), else the calibrated QDQ form (a Q/DQ
    # pair per INT8 input and weight); the manifest says which.
    form = manifest.get("ort_cpu", {}).get("int8", {}).get("form", "qdq")
    if form == "ort-dynamic":
        assert ops.count("MatMulInteger") >= 9 and "QuantizeLinear" not in ops  # 2 blocks x 4 + head
    else:
        assert form == "qdq" and ops.count("QuantizeLinear") == 2 * len(quant["modules"])
    assert manifest["precision"] == ("int8" if quant["modules"] else "fp32")
