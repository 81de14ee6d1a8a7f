"""The TensorRT path: which check ran is on record (TensorRT's own parser where it runs, the
offline list otherwise, with the reason), the parser and the trt backend fail with one line
where TensorRT is missing, and engine parity's SNR measure. Where tensorrt imports and a GPU
is visible, the parser, engine build, engine parity and the trt backend run for real."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import effvision.models  # noqa: F401
from effvision.cli import main
from effvision.export import DeployConfig, export_deployable
from effvision.export.tensorrt_runtime import MIN_SQNR_DB, compare_logits, graph_precision
from effvision.models import ModelSpec, save_model

from conftest import cli


def _trt_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec(name="vit_micro_patch4_32", kwargs={"depth": 2})
    return save_model(timm.create_model(spec.name, **spec.kwargs), spec, tmp_path_factory.mktemp("trt") / "model")


def test_manifest_records_which_check_ran(model_dir: Path, tmp_path: Path) -> None:
    export_deployable(model_dir, tmp_path / "out", DeployConfig(target="tensorrt", slim=False))
    check = json.loads((tmp_path / "out" / "manifest.json").read_text())["tensorrt_check"]
    assert graph_precision(tmp_path / "out" / "model.onnx") == "fp32"
    if _trt_gpu():
        import tensorrt

        assert check["method"] == "parser" and check["tensorrt"] == tensorrt.__version__
    else:
        assert check["method"] == "offline list 10.15" and check["op_list_tensorrt"] == "10.15"
        assert "not importable" in check["parser_not_used"] or "GPU" in check["parser_not_used"]
    # jetpack5 is TensorRT 8.5 on the device: auto never checks it with a local parser
    export_deployable(model_dir, tmp_path / "jp", DeployConfig(target="jetpack5", opset=17, slim=False))
    jp = json.loads((tmp_path / "jp" / "manifest.json").read_text())["tensorrt_check"]
    assert jp["method"] == "offline list 10.15" and "8.5" in jp["parser_not_used"]


@pytest.mark.skipif(_trt_gpu(), reason="TensorRT and a GPU are here: the missing-TensorRT messages do not apply")
def test_missing_tensorrt_is_one_line_exit_2(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", str(model_dir), "--trt-check", "parser", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--trt-check parser: the tensorrt Python package is not importable" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()  # before any work
    assert main(["bench", str(model_dir), "--backend", "trt"]) == 2
    err = capsys.readouterr().err
    assert "backend trt: the tensorrt Python package" in err and len(err.strip().splitlines()) == 1


def test_compare_logits_sqnr() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((64, 10)).astype(np.float32)
    assert compare_logits(ref, ref)["sqnr_db"] == float("inf")
    r = compare_logits(ref, ref + 0.01 * rng.standard_normal(ref.shape).astype(np.float32))
    assert 38 < r["sqnr_db"] < 42 and r["top1_agreement"] > 0.9  # noise at 1% of the signal: 40 dB
    loud = ref + 0.3 * rng.standard_normal(ref.shape).astype(np.float32)  # noise at 30%: ~10 dB
    assert compare_logits(ref, loud)["sqnr_db"] < MIN_SQNR_DB["int8"]


@pytest.mark.skipif(not _trt_gpu(), reason="needs the tensorrt package and a CUDA GPU")
def test_parser_engine_parity_and_trt_backend(model_dir: Path, tmp_path: Path) -> None:
    p = cli("export", str(model_dir), "--format", "tensorrt", "--trt-check", "parser", "--profile", "1,4,8",
            "--out", str(tmp_path / "trt"))
    assert p.returncode == 0, p.stderr
    manifest = json.loads((tmp_path / "trt" / "manifest.json").read_text())
    assert manifest["tensorrt_check"]["method"] == "parser"
    parity = manifest["tensorrt_engine"]["parity"]
    assert parity["sqnr_db"] >= MIN_SQNR_DB["fp32"] and parity["top1_agreement"] == 1.0
    assert "model.engine" in manifest["files"]
    from effvision.bench import benchmark

    for target in (str(model_dir), str(tmp_path / "trt" / "model.engine")):
        r = benchmark(target, "trt", batch_size=4, warmup=2, iters=5)
        assert r["device"] == "cuda" and r["img_per_s"] > 0 and r["input_shape"] == [4, 3, 32, 32]
