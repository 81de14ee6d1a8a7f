"""Why onnxruntime CPU INT8 pays (or not) at batch 1 and batch 32: builds the fp32 graph (effvision
export + onnxslim), onnxruntime's dynamic INT8 (export.ort_optimize) and static INT8 variants
(export.ort_static, calibrated on CIFAR-10 images resized to the model's size), then
(a) times them round-robin in one process (each round times every graph in turn, so load from
other jobs hits all alike) and (b) runs onnxruntime's profiler on each and sums node time by op
type, so the fp32 ops left in an INT8 graph and the (de)quantization overhead show as shares.
Logit SQNR and top-1 agreement vs fp32 are on held-out CIFAR-10 test images.

    .venv/bin/python scripts/int8_profile.py [--model deit_tiny_patch16_224] [--variants qdq qoperator]
        [--rounds 5] [--out int8_profile.json]
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from effvision.export.onnx import OnnxExportConfig, export_onnx
from effvision.export.ort_optimize import quantize_dynamic_int8
from effvision.export.ort_static import quantize_static_int8

from effvision.bench import time_calls

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
# static INT8 variants: keyword arguments of quantize_static_int8 (its defaults are "qdq")
VARIANTS: dict[str, dict[str, Any]] = {
    "qdq": {},
    "qoperator": {"form": "qoperator"},
    "qdq-per-channel": {"per_channel": True},
    "qdq-int8-outputs": {"float_outputs": False},
    "qdq-weight-matmuls": {"weight_matmuls_only": True},
    "qdq-conv": {"op_types": ("MatMul", "Gemm", "Conv")},
    "qdq-conv-int8-outputs": {"op_types": ("MatMul", "Gemm", "Conv"), "float_outputs": False},  # CNNs: QLinearConv
    "qoperator-conv": {"form": "qoperator", "op_types": ("MatMul", "Gemm", "Conv")},
    "qdq-s8": {"activation": "int8"},
    "qdq-percentile": {"method": "percentile"},
    "qdq-symmetric": {"extra_options": {"ActivationSymmetric": True}},
}
OVERHEAD_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def cifar_images(split: str, count: int, size: int, offset: int = 0) -> np.ndarray:
    """``count`` images of CIFAR-10 ``split``, classes in turn, bilinear-resized to ``size`` and
    normalized with ImageNet mean/std: (N, 3, size, size) float32."""
    from PIL import Image

    classes = sorted(p for p in (CIFAR / split).iterdir() if p.is_dir())
    files = [sorted(c.glob("*.jpg")) for c in classes]
    picks = [files[i % len(classes)][offset + i // len(classes)] for i in range(count)]
    arrays = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / 255
              for f in picks]
    return ((np.stack(arrays) - MEAN) / STD).transpose(0, 3, 1, 2).copy()


def session(path: Path, threads: int, profile_prefix: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    if profile_prefix is not None:
        so.enable_profiling, so.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def build(model_name: str, workdir: Path, variants: list[str], calibration: np.ndarray) -> dict[str, Any]:
    """fp32 (exported, onnxslim'd), dynamic INT8 and each static variant: name -> (path, record)."""
    import onnxslim
    import timm

    torch.manual_seed(0)  # random init: no weights to download; SQNR vs fp32 is the accuracy measure
    model = timm.create_model(model_name, num_classes=1000).eval()
    raw = export_onnx(model, workdir / "raw.onnx", tuple(calibration.shape[1:]), OnnxExportConfig())
    fp32 = workdir / "fp32.onnx"
    onnx.save(onnxslim.slim(onnx.load(str(raw))), str(fp32))
    graphs: dict[str, Any] = {"fp32": (fp32, {"form": "fp32"})}
    graphs["dynamic"] = (workdir / "dynamic.onnx", quantize_dynamic_int8(fp32, workdir / "dynamic.onnx"))
    for name in variants:
        dst = workdir / f"static-{name}.onnx"
        graphs[f"static-{name}"] = (dst, quantize_static_int8(fp32, dst, calibration, **VARIANTS[name]))
    return graphs


def accuracy(graphs: dict[str, Any], images: np.ndarray, threads: int) -> dict[str, dict[str, float]]:
    """Logit SQNR (dB) and top-1 agreement of each graph vs the fp32 graph."""
    outs = {}
    for name, (path, _) in graphs.items():
        s = session(path, threads)
        outs[name] = np.concatenate([s.run(None, {s.get_inputs()[0].name: images[i:i + 16]})[0]
                                     for i in range(0, len(images), 16)])
    ref = outs["fp32"]
    return {name: {"sqnr_db": float(10 * np.log10((ref ** 2).sum() / max(((ref - o) ** 2).sum(), 1e-30))),
                   "top1_agreement": float((ref.argmax(1) == o.argmax(1)).mean())} for name, o in outs.items()}


def roundrobin(graphs: dict[str, Any], images: np.ndarray, batch: int, rounds: int, iters: int,
               threads: int) -> dict[str, list[float]]:
    """Per round, every graph's median seconds per call over ``iters`` calls, graphs in turn."""
    calls: dict[str, Callable[[], Any]] = {}
    for name, (path, _) in graphs.items():
        s = session(path, threads)
        feed = {s.get_inputs()[0].name: np.ascontiguousarray(images[:batch])}
        calls[name] = (lambda s=s, feed=feed: s.run(None, feed))
    per_round: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        for name, fn in calls.items():
            per_round[name].append(statistics.median(time_calls(fn, 2, iters, lambda: None)))
    return dict(per_round)


def profile(path: Path, images: np.ndarray, batch: int, runs: int, threads: int, tmp: Path) -> dict[str, float]:
    """Share of summed node time by op type (the session's optimized graph: fused ops by their
    fused names), from onnxruntime's profiler over ``runs`` calls after 2 warm-up calls."""
    s = session(path, threads, str(tmp / f"{path.stem}-b{batch}"))
    feed = {s.get_inputs()[0].name: np.ascontiguousarray(images[:batch])}
    for _ in range(2 + runs):
        s.run(None, feed)
    trace = json.loads(Path(s.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    for ev in trace:
        # warm-up calls are profiled too, but they only add to every op alike once steady
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            by_op[ev["args"]["op_name"]] += ev["dur"]
    total = sum(by_op.values())
    return {op: us / total for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--variants", nargs="*", default=["qdq", "qdq-weight-matmuls", "qoperator"], choices=list(VARIANTS))
    p.add_argument("--calib", type=int, default=32, help="calibration images (CIFAR-10 train)")
    p.add_argument("--eval", type=int, default=64, help="held-out images for SQNR (CIFAR-10 test)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters-b1", type=int, default=20)
    p.add_argument("--iters-b32", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--keep", type=Path, default=None, help="write the graphs here (default: a temporary folder)")
    args = p.parse_args()
    if not CIFAR.is_dir():
        raise SystemExit(f"{CIFAR} is absent: the calibration and evaluation images come from it")
    calibration = cifar_images("train", args.calib, args.img_size)
    images = cifar_images("test", max(args.eval, 32), args.img_size)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = args.keep or Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        graphs = build(args.model, tmp, args.variants, calibration)
        result: dict[str, Any] = {"model": args.model, "threads": args.threads, "rounds": args.rounds,
                                  "command": shlex.join(["python", "scripts/int8_profile.py", *sys.argv[1:]]),
                                  "onnxruntime": ort.__version__,
                                  "records": {n: r for n, (_, r) in graphs.items()},
                                  "accuracy": accuracy(graphs, images[:args.eval], args.threads),
                                  "timing": {}, "profile": {}}
        for batch, iters in ((1, args.iters_b1), (32, args.iters_b32)):
            secs = roundrobin(graphs, images, batch, args.rounds, iters, args.threads)
            base = statistics.median(secs["fp32"])
            result["timing"][f"b{batch}"] = {
                n: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v), "max_ms": 1e3 * max(v),
                    # speed-up: fp32's median time over this graph's, and over its slowest/fastest round
                    "speedup_vs_fp32": base / statistics.median(v),
                    "speedup_range": [base / max(v), base / min(v)]} for n, v in secs.items()}
            if not args.no_profile:
                result["profile"][f"b{batch}"] = {n: profile(path, images, batch, 10 if batch == 1 else 3,
                                                             args.threads, tmp) for n, (path, _) in graphs.items()}
    report(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


def report(result: dict[str, Any]) -> None:
    print(f"{result['model']}, {result['threads']} threads, {result['rounds']} rounds, onnxruntime "
          f"{result['onnxruntime']}")
    print(f"{'graph':28s} {'SQNR dB':>8s} {'top1':>5s} " + " ".join(
        f"{'b' + b[1:] + ' ms (min-max)':>22s} {'x fp32':>6s}" for b in result["timing"]))
    for name, acc in result["accuracy"].items():
        cells = [f"{t[name]['median_ms']:8.1f} ({t[name]['min_ms']:.1f}-{t[name]['max_ms']:.1f})"
                 f" {t[name]['speedup_vs_fp32']:6.2f}" for t in result["timing"].values()]
        print(f"{name:28s} {acc['sqnr_db']:8.1f} {acc['top1_agreement']:5.2f} " + " ".join(f"{c:>29s}" for c in cells))
    for batch, graphs in result["profile"].items():
        ops = sorted({op for shares in graphs.values() for op in shares},
                     key=lambda op: -max(shares.get(op, 0.0) for shares in graphs.values()))
        print(f"\nshare of node time by op type, {batch} (overhead ops marked *)")
        print(f"{'op':28s} " + " ".join(f"{n[:14]:>14s}" for n in graphs))
        for op in ops:
            if max(shares.get(op, 0.0) for shares in graphs.values()) >= 0.005:
                print(f"{op + (' *' if op in OVERHEAD_OPS else ''):28s} "
                      + " ".join(f"{100 * shares.get(op, 0.0):13.1f}%" for shares in graphs.values()))


if __name__ == "__main__":
    main()
