"""ONNX export: torch.export-based, dynamic batch, parity in onnxruntime, manifest."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch

import effvision  # noqa: F401
from effvision.errors import EffVisionError
from effvision.export import OnnxExportConfig, ParityError, export_model_dir, sha256
from effvision.models import ModelSpec, save_model

from conftest import cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("m") / "model"
    save_model(timm.create_model("vit_micro_patch4_32"), ModelSpec("vit_micro_patch4_32", class_names=list("0123456789")), d)
    return d


def test_export_dynamic_batch_parity_and_manifest(model_dir: Path, tmp_path: Path) -> None:
    result = export_model_dir(model_dir, tmp_path / "out", OnnxExportConfig(opset=18, parity_batch_sizes=[1, 5]))
    onnx_path = tmp_path / "out" / "model.onnx"
    assert result["parity"]["max_abs_error"] <= 1e-4
    assert set(result["parity"]["per_batch"]) == {1, 5}
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 18
    # A batch size the parity check did not use still runs: the batch axis is dynamic.
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": np.zeros((7, 3, 32, 32), np.float32)})[0]
    assert out.shape == (7, 10)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["files"]["model.onnx"]["sha256"] == sha256(onnx_path)
    assert manifest["opset"] == 18 and manifest["class_names"] == list("0123456789")
    assert manifest["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and manifest["preprocessing"]["size"] == 32
    assert {"torch", "timm", "onnxruntime"} <= manifest["versions"].keys()


def test_static_batch_and_older_opset(model_dir: Path, tmp_path: Path) -> None:
    export_model_dir(model_dir, tmp_path / "o17", OnnxExportConfig(opset=17, dynamic_batch=False, parity_batch_sizes=[1]))
    proto = onnx.load(str(tmp_path / "o17" / "model.onnx"))
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 32, 32]
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17


def test_failed_parity_leaves_no_model_onnx(model_dir: Path, tmp_path: Path) -> None:
    # float32 ViT outputs differ from onnxruntime's by ~1e-7; a zero-ish tolerance must fail.
    with pytest.raises(ParityError, match="max abs error"):
        export_model_dir(model_dir, tmp_path / "strict", OnnxExportConfig(atol=1e-12, parity_batch_sizes=[4]))
    assert not (tmp_path / "strict" / "model.onnx").exists()
    assert (tmp_path / "strict" / "model.onnx.failed-parity").exists()


def test_bad_opset_is_rejected(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EffVisionError, match="opset 7"):
        export_model_dir(model_dir, tmp_path / "o7", OnnxExportConfig(opset=7))


def test_cli_export_refuses_to_overwrite(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    r = cli("export", str(model_dir), "--out", str(out))
    assert r.returncode == 0, r.stderr
    before = (out / "model.onnx").read_bytes()
    r = cli("export", str(model_dir), "--out", str(out))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("effvision: error:") and "exists already" in r.stderr
    assert (out / "model.onnx").read_bytes() == before


def test_dynamic_height_width_export(tmp_path: Path) -> None:
    """--dynamic-hw: a CNN's graph runs at any multiple of 32, checked at two sizes; a ViT with a
    fixed img_size cannot, and says so in one line."""
    torch.manual_seed(0)
    spec = ModelSpec("resnet10t", img_size=64)
    save_model(timm.create_model("resnet10t", num_classes=10), spec, tmp_path / "cnn")
    cfg = OnnxExportConfig(parity_batch_sizes=[1], dynamic_hw=True)
    result = export_model_dir(tmp_path / "cnn", tmp_path / "cnn-onnx", cfg)
    assert result["parity"]["max_abs_error"] <= 1e-4
    manifest = json.loads((tmp_path / "cnn-onnx" / "manifest.json").read_text())
    assert manifest["parity"]["sizes"] == [[64, 64], [96, 128]] and "multiple of 32" in manifest["input"]["shape"][2]
    sess = ort.InferenceSession(str(tmp_path / "cnn-onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": np.zeros((2, 3, 160, 32), np.float32)})[0].shape == (2, 10)
    with pytest.raises(EffVisionError, match="dynamic height/width"):
        export_model_dir(tmp_path / "cnn", tmp_path / "bad", OnnxExportConfig(dynamic_hw=True, hw_multiple=48))
