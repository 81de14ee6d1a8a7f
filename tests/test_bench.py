"""Inference benchmarks: effvision.bench.benchmark over torch and onnxruntime, and `effvision bench`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import effvision  # noqa: F401
from effvision.bench import benchmark, resolve_target
from effvision.errors import EffVisionError
from effvision.models import ModelSpec, save_model

WARMUP, ITERS, BATCH = 1, 3, 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    name = "vit_micro_patch4_32"
    return save_model(timm.create_model(name), ModelSpec(name=name), tmp_path_factory.mktemp("bench") / "model")


@pytest.fixture(scope="module")
def onnx_file(model_dir, tmp_path_factory) -> Path:
    from effvision.export import OnnxExportConfig, export_model_dir

    out = tmp_path_factory.mktemp("bench_onnx") / "export"
    export_model_dir(model_dir, out, OnnxExportConfig())
    return out / "model.onnx"


def _check_result(r: dict, backend: str, target: str) -> None:
    assert r["backend"] == backend and r["target"] == target and r["device"] == "cpu"
    assert r["batch_size"] == BATCH and r["iters"] == ITERS and r["warmup"] == WARMUP
    assert r["input_shape"] == [BATCH, 3, 32, 32]
    assert r["img_per_s"] > 0
    assert 0 < r["latency_ms_p50"] <= r["latency_ms_p90"]
    # throughput is the batch over the median latency
    assert r["img_per_s"] == pytest.approx(BATCH / (r["latency_ms_p50"] / 1e3), rel=1e-6)
    json.dumps(r)  # plain, serialisable values


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_benchmark_model_dir(model_dir, backend):
    r = benchmark(str(model_dir), backend, "cpu", BATCH, warmup=WARMUP, iters=ITERS)
    _check_result(r, backend, str(model_dir))


def test_benchmark_onnx_file(onnx_file):
    r = benchmark(str(onnx_file), "ort", "cpu", BATCH, warmup=WARMUP, iters=ITERS)
    _check_result(r, "ort", str(onnx_file))


def test_benchmark_timm_name_with_img_size():
    r = benchmark("vit_micro_patch4_32", "torch", "cpu", 2, img_size=32, warmup=WARMUP, iters=ITERS)
    assert r["input_shape"] == [2, 3, 32, 32] and r["img_per_s"] > 0


def test_benchmark_run_dir_finds_newest_model(model_dir, onnx_file, tmp_path):
    run = tmp_path / "run"
    (run / "01-train").mkdir(parents=True)
    shutil.copytree(model_dir, run / "01-train" / "model")
    (run / "03-export").mkdir()
    shutil.copy(onnx_file, run / "03-export" / "model.onnx")
    kind, found_model, found_onnx = resolve_target(str(run))
    assert kind == "run_dir"
    assert found_model == run / "01-train" / "model" and found_onnx == run / "03-export" / "model.onnx"
    r = benchmark(str(run), "torch", "cpu", BATCH, warmup=WARMUP, iters=ITERS)
    assert r["input_shape"] == [BATCH, 3, 32, 32]


def test_benchmark_onnx_file_has_no_torch_backend(onnx_file):
    with pytest.raises(EffVisionError, match="needs a PyTorch model"):
        benchmark(str(onnx_file), "torch", "cpu", BATCH, warmup=WARMUP, iters=ITERS)


def test_benchmark_bad_inputs(model_dir, tmp_path):
    with pytest.raises(EffVisionError, match="unknown backend 'tensorrtt'"):
        benchmark(str(model_dir), "tensorrtt")
    with pytest.raises(EffVisionError, match="neither a timm model"):
        benchmark(str(tmp_path / "does_not_exist"), "torch", warmup=WARMUP, iters=ITERS)
    with pytest.raises(EffVisionError, match="ONNX file not found"):
        benchmark(str(tmp_path / "missing.onnx"), "ort", warmup=WARMUP, iters=ITERS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EffVisionError, match="holds no model"):
        benchmark(str(tmp_path / "empty"), "torch", warmup=WARMUP, iters=ITERS)
    with pytest.raises(EffVisionError, match="batch size and iters must be positive"):
        benchmark(str(model_dir), "torch", batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(EffVisionError, match="no CUDA GPU"):
            benchmark(str(model_dir), "torch", device="cuda")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effvision", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_bench_cli_writes_json_and_refuses_to_overwrite_it(model_dir, tmp_path):
    out = tmp_path / "out.json"
    proc = _cli("bench", str(model_dir), "--backend", "torch", "ort", "--iters", "3", "--warmup", "1",
                "--batch-size", str(BATCH), "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert isinstance(results, list) and len(results) == 2
    assert [r["backend"] for r in results] == ["torch", "ort"]
    for r in results:
        _check_result(r, r["backend"], str(model_dir))
    # one line per backend on stdout, with its throughput
    for backend in ("torch", "ort"):
        assert any(line.startswith(backend) and "img/s" in line for line in proc.stdout.splitlines()), proc.stdout

    before = out.read_bytes()
    again = _cli("bench", str(model_dir), "--backend", "torch", "--iters", "3", "--warmup", "1",
                 "--batch-size", str(BATCH), "--json", str(out), cwd=tmp_path)
    assert again.returncode == 2, again.stderr
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("effvision: error:") and "exists already" in lines[0], again.stderr
    assert "Traceback" not in again.stderr
    assert out.read_bytes() == before


def test_bench_cli_unknown_target_is_exit_2(tmp_path, capsys):
    from effvision.cli import main

    assert main(["bench", str(tmp_path / "nope"), "--iters", "1", "--warmup", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("effvision: error:") and err.count("\n") == 1


def test_bench_cli_json_into_missing_folder(model_dir, tmp_path, capsys):
    from effvision.cli import main

    out = tmp_path / "results" / "out.json"
    rc = main(["bench", str(model_dir), "--iters", "1", "--warmup", "0", "--batch-size", "2", "--json", str(out)])
    err = capsys.readouterr().err
    assert (rc == 0 and len(json.loads(out.read_text())) == 1) or (rc == 2 and err.startswith("effvision: error:"))
