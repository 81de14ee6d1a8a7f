"""OpenVINO vs onnxruntime img/s on this CPU, fp32 and INT8, from the same exported ONNX files.

Each model is exported once (fp32) and quantized once (INT8 PTQ, ort-cpu target, calibrated on
random images: speed does not depend on the weights); the four runners then alternate call by
call so load from other jobs hits all alike, and the figure is the median per runner. The table
is filed in the results ledger (section openvino-vs-ort, every call's seconds) unless --no-ledger.

    .venv/bin/python scripts/openvino_vs_ort.py [--models vit_micro_patch4_32 deit_tiny_patch16_224]
        [--batch-sizes 32 1] [--calls 30] [--threads 2] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch

import effvision  # noqa: F401
from effvision.benchmarks.ledger import add_arguments, record
from effvision.runinfo import cpu_name
from effvision.compress.quantize import QuantConfig, quantize_
from effvision.export import OnnxExportConfig, export_model_dir
from effvision.export.openvino import convert_to_openvino, openvino_session
from effvision.models.io import ModelSpec, save_model


def exports(name: str, work: Path) -> tuple[tuple[int, int, int], dict[str, Path]]:
    """(input shape, {'fp32': onnx, 'int8': onnx}) for a timm model at its default size."""
    size = timm.create_model(name).pretrained_cfg["input_size"]
    spec = ModelSpec(name=name, num_classes=1000 if "patch16_224" in name else 10, img_size=size[-1])
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=spec.num_classes).eval()
    save_model(model, spec, work / "fp32")
    export_model_dir(work / "fp32", work / "fp32-onnx", OnnxExportConfig(parity_batch_sizes=[1]))
    calib = [(torch.randn(16, *size), torch.zeros(16, dtype=torch.long)) for _ in range(4)]
    quantize_(model, QuantConfig(target="ort-cpu", calib_batches=4, min_calib_samples=64), calib, progress=False)
    save_model(model, spec, work / "int8")
    export_model_dir(work / "int8", work / "int8-onnx", OnnxExportConfig(parity_batch_sizes=[1]))
    return tuple(size), {"fp32": work / "fp32-onnx" / "model.onnx", "int8": work / "int8-onnx" / "model.onnx"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_micro_patch4_32", "deit_tiny_patch16_224"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 1])
    p.add_argument("--calls", type=int, default=30, help="timed calls per runner (alternating)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the rows here")
    add_arguments(p)
    args = p.parse_args()
    rows, timings = [], []
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            shape, files = exports(name, Path(tmp))
            runners = {}
            for precision, onnx_path in files.items():
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = args.threads
                session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
                feed = session.get_inputs()[0].name
                runners[("onnxruntime", precision)] = lambda x, s=session, f=feed: s.run(None, {f: x})
                compiled = openvino_session(convert_to_openvino(onnx_path, Path(tmp) / f"ov-{precision}"),
                                            args.threads)
                runners[("openvino", precision)] = lambda x, c=compiled: c(x)
            for batch in args.batch_sizes:
                x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
                for run in runners.values():
                    for _ in range(3):
                        run(x)  # warm-up
                times: dict[tuple[str, str], list[float]] = {k: [] for k in runners}
                for _ in range(args.calls):
                    for key, run in runners.items():
                        t0 = time.perf_counter()
                        run(x)
                        times[key].append(time.perf_counter() - t0)
                base = statistics.median(times[("onnxruntime", "fp32")])
                for (runtime, precision), t in times.items():
                    med = statistics.median(t)
                    rows.append({"model": name, "batch": batch, "runtime": runtime, "precision": precision,
                                 "img_per_s": round(batch / med, 1), "vs_ort_fp32": round(base / med, 3)})
                    timings.append({"model": name, "batch": batch, "runtime": runtime, "precision": precision,
                                    "seconds": t})
                    print(json.dumps(rows[-1]), flush=True)
    print(f"\n{cpu_name()}, {args.threads} threads, median of {args.calls} alternating calls\n")
    print("| model | batch | runtime | precision | img/s | vs onnxruntime fp32 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['runtime']} | {r['precision']} | {r['img_per_s']:,.1f} | "
              f"{r['vs_ort_fp32']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": cpu_name(), "threads": args.threads, "rows": rows}, indent=2))
    if not args.no_ledger:
        table = [{"model": r["model"], "batch": r["batch"], "runtime": r["runtime"], "precision": r["precision"],
                  "img/s (median)": r["img_per_s"],
                  "spread (min-max) img/s": "{:,.1f}-{:,.1f}".format(r["batch"] / max(m["seconds"]),
                                                                     r["batch"] / min(m["seconds"])),
                  "vs onnxruntime fp32": r["vs_ort_fp32"], "calls": args.calls} for r, m in zip(rows, timings)]
        command = shlex.join(["python", "scripts/openvino_vs_ort.py", *sys.argv[1:]])
        path = record("openvino-vs-ort", table, {"threads": args.threads, "seconds_per_call": timings}, command,
                      "scripts/openvino_vs_ort.py", args.ledger_dir)
        print(f"ledger: {path}")


if __name__ == "__main__":
    main()
