"""CPU figures for README's quantization section: deit_tiny (random init: no downloads here)
int8 PTQ output agreement with fp32, and onnxruntime throughput at batch 32 of fp32 vs
effvision's QDQ graphs (tensorrt form S8S8, ort-cpu form U8S8) vs onnxruntime's own dynamic
int8, timed round-robin in one process so that load on the machine hits all alike.

    .venv/bin/python scripts/quant_cpu_figures.py [--model deit_tiny_patch16_224] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch

import effvision.models  # noqa: F401
from effvision.compress.quantize import QuantConfig, quant_spec, quantize_, write_quant_spec
from effvision.export import DeployConfig, OnnxExportConfig, export_deployable, export_onnx
from effvision.models.io import ModelSpec, save_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    ref = timm.create_model(args.model).eval()
    size = ref.pretrained_cfg["input_size"][1]
    spec = ModelSpec(name=args.model, num_classes=ref.num_classes, img_size=size)
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(16, 3, size, size, generator=g), None) for _ in range(4)]
    test = torch.randn(64, 3, size, size, generator=g)
    with torch.no_grad():
        ref_out = torch.cat([ref(t) for t in test.split(16)])
    tmp = Path(tempfile.mkdtemp())
    files = {"fp32": export_onnx(ref, tmp / "fp32.onnx", (3, size, size), OnnxExportConfig())}
    figures: dict = {"model": args.model, "batch_size": args.batch_size, "threads": args.threads}
    for target in ("tensorrt", "ort-cpu"):
        model = timm.create_model(args.model).eval()
        model.load_state_dict(ref.state_dict())
        quantize_(model, QuantConfig(target=target, calib_method="percentile", calib_batches=4, min_calib_samples=16),
                  calib, progress=False)
        with torch.no_grad():
            out = torch.cat([model(t) for t in test.split(16)])
        figures[f"{target}_top1_agreement"] = float((out.argmax(1) == ref_out.argmax(1)).float().mean())
        # logit SQNR: random-init logits are nearly flat, so top-1 agreement alone undersells int8
        figures[f"{target}_sqnr_db"] = float(10 * torch.log10(ref_out.pow(2).mean() / (out - ref_out).pow(2).mean()))
        d = tmp / target
        write_quant_spec(d, quant_spec(model, "int8", target, False))
        save_model(model, spec, d)
        export_deployable(d, d / "onnx", DeployConfig(target=target))
        files[f"int8 {target}"] = d / "onnx" / "model.onnx"
    from onnxruntime.quantization import QuantType, quantize_dynamic

    m = onnx.load(str(files["fp32"]))
    del m.graph.value_info[:]  # the dynamo graph's value_info trips the quantizer (baselines.md)
    onnx.save(m, str(tmp / "novi.onnx"))
    quantize_dynamic(str(tmp / "novi.onnx"), str(tmp / "dyn.onnx"), weight_type=QuantType.QInt8)
    files["ort quantize_dynamic"] = tmp / "dyn.onnx"
    x = np.random.default_rng(0).standard_normal((args.batch_size, 3, size, size), dtype=np.float32)
    sessions = {}
    for k, f in files.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sessions[k] = ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"])
        sessions[k].run(None, {"input": x})
    times: dict[str, list[float]] = {k: [] for k in files}
    for _ in range(args.rounds):  # round-robin: each round times every graph back to back
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {"input": x})
            times[k].append(time.perf_counter() - t0)
    ips = {k: args.batch_size / statistics.median(v) for k, v in times.items()}
    figures["img_per_s"] = ips
    figures["speedup_vs_fp32"] = {k: v / ips["fp32"] for k, v in ips.items()}
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
