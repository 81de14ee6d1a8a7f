"""gpu_bench.sh section ``quantize``: deit_tiny on the GPU in fp32/fp16/bf16 (torch), the
int8 and fp8 fake-quant models' output agreement with fp32, and, where the tensorrt package
imports, strongly typed TensorRT engines from the fp16 / int8 / fp8 ONNX."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["quantize_section", "quantize_markdown"]

MODEL = "deit_tiny_patch16_224"


def quantize_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    from effvision.bench import benchmark
    from effvision.gpu_sections import seconds_left

    from . import QuantConfig, quant_spec, quantize_, write_quant_spec

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
            write_quant_spec(d, quant_spec(model, precision, "tensorrt", False))
            save_model(model.cpu(), ModelSpec(name=model_name, num_classes=model.num_classes, img_size=size), d)
            if seconds_left(args) > 60:  # the QDQ export and its parity checks take ~30 s at 224x224
                row.update(_engine(d, precision))
            else:
                row["tensorrt"] = "export skipped (budget)"
            rows.append(row)
            print(f"  quantize: {row}", flush=True)
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
    return {"tensorrt": info.get("tensorrt"), "engine_built": True}


def quantize_markdown(rows: list[dict[str, Any]]) -> list[str]:
    def cell(k: str, v: Any) -> str:
        return f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"

    lines = ["| what | result |", "|---|---|"]
    return lines + [f"| {r['what']} | {', '.join(cell(k, v) for k, v in r.items() if k != 'what')} |" for r in rows]
