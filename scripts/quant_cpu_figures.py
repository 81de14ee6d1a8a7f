"""CPU figures for README's quantization section: onnxruntime throughput of every fp32 and INT8
graph of one model, timed round-robin in one process (each round times every graph back to
back, so load on the machine hits all alike), at batch 32 and batch 1, with INT8 agreement
and logit SQNR vs fp32 on real images (CIFAR-10 test images resized to the model's size).

Graphs: fp32 as effvision's plain export writes it (dynamo exporter, GELU in onnxruntime's
fusable order), as the dynamo exporter wrote it before (the exporter's own GELU), as the
TorchScript exporter writes it, and with onnxruntime's transformer optimizer (ort_optimize),
with and without one fused Attention op per block; INT8 as effvision's ort-cpu export
(onnxruntime's dynamic quantization of the plain graph), the same on the optimized and on the
fused graph (QAttention), and effvision's calibrated QDQ graphs (ort-cpu U8S8 and tensorrt
S8S8 forms, calibrated on 64 CIFAR-10 training images). The table is filed in the results ledger
(section quant-cpu-figures, every round's seconds) unless --no-ledger.

    .venv/bin/python scripts/quant_cpu_figures.py [--model deit_tiny_patch16_224 | --model-dir DIR]
        [--rounds 7] [--images 256]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch

import effvision.models  # noqa: F401
from effvision.benchmarks.ledger import add_arguments, record
from effvision.compress.quantize import QuantConfig, quantize_
from effvision.export import DeployConfig, OnnxExportConfig, export_deployable, export_onnx
from effvision.models.io import ModelSpec, load_model, save_model

CIFAR = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cifar10"


def real_images(n: int, size: int, mean, std, split: str = "test") -> np.ndarray | None:
    """n CIFAR-10 images of ``split`` (equal per class), resized to size x size and normalized."""
    if n <= 0 or not (CIFAR / split).is_dir():
        return None
    from PIL import Image

    classes = sorted(p for p in (CIFAR / split).iterdir() if p.is_dir())
    files = [f for i in range(n) for f in [sorted(classes[i % len(classes)].iterdir())[i // len(classes)]]]
    m, s = np.array(mean, np.float32)[:, None, None], np.array(std, np.float32)[:, None, None]
    return np.stack([(np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC), np.float32)
                      .transpose(2, 0, 1) / 255 - m) / s for f in files])


def build(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Path], torch.nn.Module, ModelSpec]:
    if args.model_dir:
        ref, spec = load_model(args.model_dir)
    else:
        torch.manual_seed(0)
        ref = timm.create_model(args.model)
        size = ref.pretrained_cfg["input_size"][1]
        spec = ModelSpec(name=args.model, num_classes=ref.num_classes, img_size=size,
                         mean=list(ref.pretrained_cfg["mean"]), std=list(ref.pretrained_cfg["std"]))
    ref.eval()
    shape = (3, spec.img_size, spec.img_size)
    save_model(ref, spec, tmp / "fp32")
    files = {"fp32 dynamo (plain export)": export_onnx(ref, tmp / "dynamo.onnx", shape, OnnxExportConfig())}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # exporters' progress lines
        warnings.simplefilter("ignore")
        # before the fix: the dynamo exporter's own GELU decomposition
        sdpa = torch.onnx.export(ref, (torch.randn(2, *shape),), dynamo=True, opset_version=18,
                                 input_names=["input"], output_names=["logits"],
                                 dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
        sdpa.save(str(tmp / "sdpa.onnx"))
        torch.onnx.export(ref, (torch.randn(2, *shape),), str(tmp / "ts.onnx"), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    files["fp32 dynamo, exporter GELU (export before this fix)"] = tmp / "sdpa.onnx"
    files["fp32 torchscript exporter (plain)"] = tmp / "ts.onnx"
    export_deployable(tmp / "fp32", tmp / "fp32-ort", DeployConfig(target="ort-cpu", ort_optimize=True))
    files["fp32 ort-cpu, ORT transformer optimizer"] = tmp / "fp32-ort" / "model.onnx"
    export_deployable(tmp / "fp32", tmp / "fp32-fa", DeployConfig(target="ort-cpu", ort_optimize=True,
                                                                   ort_fused_attention=True))
    files["fp32 ort-cpu, fused Attention + optimizer"] = tmp / "fp32-fa" / "model.onnx"
    real = real_images(64, spec.img_size, spec.mean, spec.std, "train")  # calibrate as a recipe would
    calib = ([(torch.from_numpy(t), None) for t in np.split(real, 4)] if real is not None else
             [(torch.randn(16, *shape, generator=torch.Generator().manual_seed(1)), None) for _ in range(4)])
    for target in ("ort-cpu", "tensorrt"):
        model, _ = load_model(tmp / "fp32")
        quantize_(model.eval(), QuantConfig(target=target, calib_method="percentile", calib_batches=4,
                                            min_calib_samples=16), calib, progress=False)
        d = tmp / f"q-{target}"
        save_model(model, spec, d)
        if target == "ort-cpu":  # effvision's ort-cpu INT8 export: the chosen form
            export_deployable(d, d / "onnx", DeployConfig(target=target))
            files["int8 ort-cpu export (dynamic, plain graph)"] = d / "onnx" / "model.onnx"
            export_deployable(d, d / "opt", DeployConfig(target=target, ort_optimize=True))
            files["int8 dynamic, optimized graph"] = d / "opt" / "model.onnx"
            export_deployable(d, d / "fa", DeployConfig(target=target, ort_optimize=True, ort_fused_attention=True))
            files["int8 dynamic, fused graph (QAttention)"] = d / "fa" / "model.onnx"
        export_deployable(d, d / "qdq", DeployConfig(target=target, ort_int8_form="qdq"))
        files[f"int8 QDQ {target} form ({'U8S8' if target == 'ort-cpu' else 'S8S8'})"] = d / "qdq" / "model.onnx"
    return files, ref, spec


def time_round_robin(sessions: dict, batch: int, size: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of every session in each round."""
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    reps = max(1, 32 // batch)  # batch 1: 32 calls per timing, so a round is not one short call
    for s in sessions.values():
        s.run(None, {"input": x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                s.run(None, {"input": x})
            times[k].append((time.perf_counter() - t0) / reps)
    return times


def plot(out: dict, agree: dict[str, dict[str, float]], path: Path) -> None:
    """Accuracy against speed: each graph's top-1 agreement with PyTorch fp32 against its batch-32
    img/s, ratios to the fastest fp32 graph beside the points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    markers = "osD^v<>phX*"
    for i, (k, a) in enumerate(agree.items()):  # one marker per graph, named in the legend (labels overlap)
        b32 = out["batch 32"][k]
        ax.scatter(b32["img_per_s"], 100 * a["top1_agreement"], marker=markers[i % len(markers)], s=45,
                   color="#c44e52" if "int8" in k else "#4878d0", label=f"{k} ({b32['vs_fastest_fp32']:.2f}x)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel("onnxruntime img/s, batch 32 (median of rounds)")
    ax.set_ylabel("top-1 agreement with PyTorch fp32 (%)")
    ax.set_title(f"{out['model']}, {out['threads']} threads: INT8 (red) and fp32 graphs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--model-dir", help="a trained effvision model dir instead of a random-init timm model")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=256, help="real images for agreement/SQNR (0: skip)")
    add_arguments(p)
    p.add_argument("--plot", type=Path, help="write top-1 agreement against batch-32 img/s here (a .png)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    files, ref, spec = build(args, tmp)
    sessions = {}
    for k, f in files.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        sessions[k] = ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"])
    out: dict = {"model": args.model_dir or args.model, "threads": args.threads, "rounds": args.rounds}
    seconds: dict[int, dict[str, list[float]]] = {}
    for batch in (32, 1):
        seconds[batch] = time_round_robin(sessions, batch, spec.img_size, args.rounds)
        ips = {k: batch / statistics.median(v) for k, v in seconds[batch].items()}
        best = max(v for k, v in ips.items() if k.startswith("fp32"))
        out[f"batch {batch}"] = {k: {"img_per_s": round(v, 1), "vs_fastest_fp32": round(v / best, 2)}
                                 for k, v in ips.items()}
    x = real_images(args.images, spec.img_size, spec.mean, spec.std)
    agree: dict[str, dict[str, float]] = {}
    if x is not None:
        with torch.no_grad():
            logits = torch.cat([ref(t) for t in torch.from_numpy(x).split(32)]).numpy()
        for k, s in sessions.items():
            o = np.concatenate([s.run(None, {"input": t})[0] for t in np.array_split(x, max(1, len(x) // 32))])
            noise = max(float(((o - logits) ** 2).mean()), 1e-30)
            agree[k] = {"top1_agreement": round(float((o.argmax(1) == logits.argmax(1)).mean()), 4),
                        "sqnr_db": round(float(10 * np.log10((logits ** 2).mean() / noise)), 1)}
        out[f"vs PyTorch fp32 on {len(x)} CIFAR-10 test images at {spec.img_size}px"] = agree
    print(json.dumps(out, indent=2))
    if args.plot and agree:
        plot(out, agree, args.plot)
    if not args.no_ledger:
        table = []
        for k in sessions:
            row: dict = {"graph": k}
            for batch in (32, 1):
                t = seconds[batch][k]
                row.update({f"b{batch} img/s (median)": out[f"batch {batch}"][k]["img_per_s"],
                            f"b{batch} spread (min-max)": f"{batch / max(t):,.1f}-{batch / min(t):,.1f}",
                            f"b{batch} vs fastest fp32": out[f"batch {batch}"][k]["vs_fastest_fp32"]})
            if agree:
                row.update({"top-1 agreement": agree[k]["top1_agreement"], "SQNR (dB)": agree[k]["sqnr_db"]})
            table.append({**row, "rounds": args.rounds})
        raw = {"model": out["model"], "threads": args.threads, "agreement": agree,
               "seconds_per_round": {f"batch {b}": v for b, v in seconds.items()}}
        command = shlex.join(["python", "scripts/quant_cpu_figures.py", *sys.argv[1:]])
        path = record("quant-cpu-figures", table, raw, command, "scripts/quant_cpu_figures.py", args.ledger_dir)
        print(f"ledger: {path}", file=sys.stderr)  # stdout stays one JSON document


if __name__ == "__main__":
    main()
