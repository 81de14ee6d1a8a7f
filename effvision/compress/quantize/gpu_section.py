"""gpu_bench.sh section ``quantize``: deit_tiny on the GPU in fp32/fp16/bf16 (torch), the
int8 and fp8 fake-quant models' output agreement with fp32, and, where the tensorrt package
imports, strongly typed TensorRT engines from the int8 / fp8 ONNX (parity vs onnxruntime, img/s
through the trt backend) and int8_layers: measured judged in TensorRT."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import QuantConfig

__all__ = ["quantize_section", "quantize_markdown"]

MODEL = "deit_tiny_patch16_224"


def quantize_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    from effvision.bench import benchmark
    from effvision.benchmarks.registry import seconds_left

    from . import quantize_

    toy = getattr(args, "toy", False)
    model_name, size, batch = ("vit_micro_patch4_32", 32, 2) if toy else (MODEL, 224, 256)
    rows: list[dict[str, Any]] = []
    for amp in ("off",) if toy else ("off", "fp16", "bf16"):
        r = benchmark(model_name, "torch", "cpu" if toy else "cuda", batch, img_size=size, warmup=1 if toy else 5,
                      iters=2 if toy else 15, amp=amp, channels_last=not toy)
        rows.append({"what": f"torch {amp if amp != 'off' else 'fp32'}", "img_per_s": r["img_per_s"]})
        print(f"  quantize: torch {amp}: {r['img_per_s']:.0f} img/s", flush=True)
    import timm

    from effvision.models.io import ModelSpec, save_model

    dev = torch.device("cpu" if toy else "cuda")
    torch.manual_seed(0)
    ref = timm.create_model(model_name).eval().to(dev)
    x = torch.randn(64, 3, size, size, device=dev)  # random-init weights, random data: agreement only
    with torch.no_grad():
        ref_out = ref(x)
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("int8", "fp8"):
            if seconds_left(args) < 20:
                rows.append({"what": f"fake-quant {precision}", "skipped": "budget"})
                continue
            model = timm.create_model(model_name).eval().to(dev)
            model.load_state_dict(ref.state_dict())
            quantize_(model, QuantConfig(precision=precision, calib_batches=4, min_calib_samples=16),
                      [(x[i:i + 16], None) for i in range(0, 64, 16)], progress=False)
            with torch.no_grad():
                out = model(x)
            agree = float((out.argmax(1) == ref_out.argmax(1)).float().mean())
            row = {"what": f"fake-quant {precision}", "top1_agreement_vs_fp32": agree}
            d = Path(tmp) / precision
            save_model(model.cpu(), ModelSpec(name=model_name, num_classes=model.num_classes, img_size=size), d)
            if seconds_left(args) > 60:  # the QDQ export and its parity checks take ~30 s at 224x224
                row.update(_engine(d, precision))
            else:
                row["tensorrt"] = "export skipped (budget)"
            rows.append(row)
            print(f"  quantize: {row}", flush=True)
            if precision == "int8" and not toy and row.get("engine_built") and seconds_left(args) > 120:
                rows.append(_measured(model.cpu(), size))
                print(f"  quantize: {rows[-1]}", flush=True)
    return rows


def _engine(model_dir: Path, precision: str) -> dict[str, Any]:
    from effvision.export import DeployConfig, export_deployable
    from effvision.export.tensorrt_engine import build_engine, manifest_of, tensorrt_available

    out = model_dir / "onnx"
    export_deployable(model_dir, out, DeployConfig(opset=19 if precision == "fp8" else 18))
    if not tensorrt_available():
        return {"tensorrt": "not installed: engine not built (build_engine.sh written)",
                **{k: v for k, v in build_engine(out / "model.onnx", manifest_of(out), (1, 64, 256)).items()
                   if k == "command"}}
    info = build_engine(out / "model.onnx", manifest_of(out), (1, 64, 256))
    from effvision.bench import benchmark

    r = benchmark(str(out / "model.engine"), "trt", batch_size=256, warmup=10, iters=50)  # CUDA-event timing
    return {"tensorrt": info.get("tensorrt"), "engine_built": True, "engine_sqnr_db_vs_ort": info["parity"]["sqnr_db"],
            "trt_img_per_s": r["img_per_s"]}


def _measured(model: torch.nn.Module, size: int) -> dict[str, Any]:
    """int8_layers: measured in TensorRT: which deit_tiny blocks TensorRT runs faster in INT8."""
    from .measured import measure_int8_layers_

    record = measure_int8_layers_(model, QuantConfig(int8_layers="measured", int8_runtime="tensorrt",
                                                     int8_batch_size=64, int8_rounds=9), (3, size, size),
                                  progress=False)
    kept = [g for g, r in record["groups"].items() if r["int8"]]
    return {"what": "int8_layers measured (tensorrt)", "int8_groups": f"{len(kept)}/{len(record['groups'])}",
            **{k: v for k, v in record["final"].items()}}


def quantize_markdown(rows: list[dict[str, Any]]) -> list[str]:
    def cell(k: str, v: Any) -> str:
        return f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"

    lines = ["| what | result |", "|---|---|"]
    return lines + [f"| {r['what']} | {', '.join(cell(k, v) for k, v in r.items() if k != 'what')} |" for r in rows]
