"""Compressed detectors exported whole, on the CPU: mAP against measured latency.

An FCOS detector over resnet10t (random init) is trained on COCO128 at a small size by an
effvision recipe (a memorisation check: COCO128 trains and evaluates on the same 128 images),
then pruned inside the detector (channels of the trunk and the neck's inputs) and fine-tuned
(optionally distilled from the dense detector's pyramid maps: --distill-weight); the dense
detector is fine-tuned as long (ratio 0, "dense+ft"): the fair reference for the pruned ones. Each variant is exported whole (image -> boxes,
NMS in the graph) in fp32 and INT8 (onnxruntime static QDQ, calibrated on COCO128 images),
parity-checked against PyTorch, and its COCO mAP computed from onnxruntime's and OpenVINO's
outputs. All exported graphs are then timed round-robin in one process, in onnxruntime and
OpenVINO, at batch 1 (latency) and batch 8 (throughput). Table on stdout, JSON and plot in --out,
the table filed in the results ledger (section detection-cpu) unless --no-ledger. A rerun reuses
the trained, pruned and exported detectors found in --out.

  .venv/bin/python scripts/detection_cpu_figures.py --out runs/detection_cpu_figures \
      [--epochs 100] [--size 128] [--ratios 0 0.2 0.3] [--finetune-epochs 60] [--rounds 7]
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
import yaml

from effvision.benchmarks.ledger import add_arguments, record
from effvision.data.coco import CocoDataConfig, coco_samples, detection_loader
from effvision.detection.evaluate import evaluate_coco
from effvision.detection.export import ExportedDetector
from effvision.detection.io import load_detector, save_detector
from effvision.detection.prune import prune_detector_
from effvision.detection.stages import ExportDetectionConfig, export_whole_detector
from effvision.detection.train import train_detector
from effvision.engine.optim import OptimizerConfig

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def train_dense(args: argparse.Namespace, out: Path) -> Path:
    """The dense detector dir of an effvision run (reused when finished)."""
    data = {"root": str(args.coco), "batch_size": 8}
    recipe = {"name": "detection_cpu_figures", "seed": 0, "device": "cpu", "threads": args.threads,
              "model": {"name": "resnet10t"},
              "stages": [{"type": "train_detection", "detector": "fcos", "out_channels": 64, "data": data,
                          "min_size": args.size, "max_size": args.size, "fixed_size": [args.size, args.size],
                          "epochs": args.epochs, "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4},
                          "warmup_steps": 50, "grad_clip": 10.0, "log_every": 16}]}
    detector = out / "dense" / "01-train_detection" / "detector"
    if not detector.is_dir():
        path = out / "dense.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        cmd = [sys.executable, "-m", "effvision", "run", str(path), "--out", str(out / "dense"), "--resume"]
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            raise SystemExit(f"training failed: {' '.join(cmd)}")
    return detector


def prune_finetune(dense: Path, ratio: float, args: argparse.Namespace, out: Path) -> tuple[Path, dict[str, Any]]:
    """Prune the dense detector's backbone by ``ratio`` (0: not at all, the fair reference for the
    pruned ones: as many training epochs in all), then fine-tune it."""
    folder = out / (f"pruned-{ratio:g}" if ratio else "dense-finetuned")
    if (folder / "report.json").is_file():
        return folder / "detector", json.loads((folder / "report.json").read_text())
    detector, spec = load_detector(dense)
    teacher, _ = load_detector(dense)
    t0 = time.perf_counter()
    report = prune_detector_(detector, ratio, example_size=(args.size, args.size)) if ratio else {}
    samples, _ = coco_samples(CocoDataConfig(root=str(args.coco), batch_size=8), train=True)
    loader = detection_loader(samples, 8, shuffle=True, seed=0)
    result = train_detector(detector, loader, epochs=args.finetune_epochs, device=torch.device("cpu"),
                            optimizer=OptimizerConfig(name="adamw", lr=5e-4, weight_decay=1e-4), warmup_steps=20,
                            grad_clip=10.0, teacher=teacher.eval() if args.distill_weight else None,
                            distill_weight=args.distill_weight)
    save_detector(detector.cpu(), spec, folder / "detector")
    losses = result.pop("losses")
    summary = {"ratio": ratio, "prune": {k: v for k, v in report.items() if k != "entry"},
               "finetune_epochs": args.finetune_epochs, "distill_weight": args.distill_weight,
               "loss_first": losses[0], "loss_last": losses[-1], "wall_time_s": time.perf_counter() - t0}
    (folder / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    return folder / "detector", summary


def export(detector: Path, label: str, precision: str, args: argparse.Namespace, out: Path) -> tuple[Path, dict[str, Any]]:
    folder = out / "exports" / f"{label.replace(' ', '-')}-{precision}"
    if (folder / "result.json").is_file():
        return folder, json.loads((folder / "result.json").read_text())
    cfg = ExportDetectionConfig(format="openvino", precision=precision, calib_images=args.calib_images,
                                data=CocoDataConfig(root=str(args.coco), batch_size=8))
    result = export_whole_detector(detector, folder, cfg)
    samples, _ = coco_samples(CocoDataConfig(root=str(args.coco)), train=False)
    ov = evaluate_coco(ExportedDetector(folder / "model.xml", runtime="openvino"), samples, torch.device("cpu"))
    result["map_openvino"] = ov["bbox_mAP"]
    (folder / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return folder, result


def time_round_robin(folders: dict[str, Path], args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Per contender (variant x runtime x batch), seconds per call in every round; contenders take
    turns within a round, so load from other jobs falls on all alike."""
    from tqdm import tqdm

    samples, _ = coco_samples(CocoDataConfig(root=str(args.coco)), train=False)
    resized = [torch.nn.functional.interpolate(samples[i][0][None], size=(args.size, args.size), mode="bilinear",
                                               align_corners=False)[0] for i in range(8)]
    batches = {1: torch.stack(resized[:1]).numpy(), 8: torch.stack(resized).numpy()}
    runners: dict[str, Any] = {}
    for name, folder in folders.items():
        import onnxruntime as ort

        from effvision.export.openvino import openvino_session

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(folder / "detector.onnx"), opts, providers=["CPUExecutionProvider"])
        compiled = openvino_session(folder / "model.xml", args.threads)
        for b, x in batches.items():
            runners[f"{name}|ort|{b}"] = (lambda s=session, x=x: s.run(None, {"images": x}))
            runners[f"{name}|openvino|{b}"] = (lambda c=compiled, x=x: c(x))
    times: dict[str, list[float]] = {k: [] for k in runners}
    for fn in runners.values():  # warm-up, untimed
        for _ in range(3):
            fn()
    with tqdm(total=args.rounds * len(runners), desc="round-robin", unit="run") as bar:
        for _ in range(args.rounds):
            for key, fn in runners.items():
                calls = args.calls if key.endswith("|1") else max(2, args.calls // 4)
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[key].append((time.perf_counter() - t0) / calls)
                bar.update()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "detection_cpu_figures")
    ap.add_argument("--coco", type=Path, default=ROOT.parent / "shared" / "datasets" / "coco128")
    ap.add_argument("--dense", type=Path, help="a trained detector dir to start from (default: train one)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--ratios", type=float, nargs="*", default=[0, 0.2, 0.3],
                    help="pruning ratios, each fine-tuned --finetune-epochs (0: the dense detector fine-tuned as long)")
    ap.add_argument("--finetune-epochs", type=int, default=60)
    ap.add_argument("--distill-weight", type=float, default=0.0,
                    help="pyramid distillation from the dense detector (0: plain fine-tune, the best measured here)")
    ap.add_argument("--calib-images", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20, help="calls per contender per round at batch 1 (batch 8: a quarter)")
    ap.add_argument("--threads", type=int, default=2)
    add_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    dense = args.dense or train_dense(args, args.out)
    detectors = {"dense": (dense, {})}
    for ratio in args.ratios:
        detectors[f"pruned {ratio:g}" if ratio else "dense+ft"] = prune_finetune(dense, ratio, args, args.out)
    exports: dict[str, tuple[Path, dict[str, Any]]] = {}
    for name, (d, _) in detectors.items():
        for precision in ("fp32", "int8"):
            exports[f"{name} {precision}"] = export(d, name, precision, args, args.out)
    times = time_round_robin({k: v[0] for k, v in exports.items()}, args)
    base = statistics.median(times["dense fp32|ort|1"])
    rows, points = [], []
    for name, (folder, result) in exports.items():
        med = {k.split("|", 1)[1]: statistics.median(v) for k, v in times.items() if k.startswith(name + "|")}
        spread = np.percentile(np.array(times[f"{name}|ort|1"]) * 1e3, [10, 90])
        variant = name.rsplit(" ", 1)[0]
        params = sum(p.numel() for p in load_detector(detectors[variant][0])[0].parameters())
        rows.append({"detector": name, "mAP (onnxruntime)": round(result["map"]["exported"], 3),
                     "mAP (OpenVINO)": round(result["map_openvino"], 3),
                     "mAP PyTorch": round(result["map"]["pytorch"], 3),
                     "params (M)": round(params / 1e6, 2),
                     "ort ms b1 (p10-p90)": f"{med['ort|1'] * 1e3:.2f} ({spread[0]:.2f}-{spread[1]:.2f})",
                     "OpenVINO ms b1": round(med["openvino|1"] * 1e3, 2),
                     "ort img/s b8": round(8 / med["ort|8"], 1), "OpenVINO img/s b8": round(8 / med["openvino|8"], 1),
                     "ort speed-up b1": round(base / med["ort|1"], 2)})
        points.append((name, med["ort|1"] * 1e3, med["openvino|1"] * 1e3, result["map"]["exported"],
                       result["map_openvino"]))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    raw = {"times_s": times, "exports": {k: v[1] for k, v in exports.items()},
           "detectors": {k: v[1] for k, v in detectors.items()}, "size": args.size, "threads": args.threads,
           "rounds": args.rounds, "calls": args.calls}
    (args.out / "detection_cpu_figures.json").write_text(json.dumps({"rows": rows, "raw": raw}, indent=2, default=str))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, ort_ms, ov_ms, m_ort, m_ov in points:
        ax.scatter(ort_ms, m_ort, marker="o", color="C0")
        ax.scatter(ov_ms, m_ov, marker="s", color="C1")
        ax.annotate(name, (ort_ms, m_ort), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.scatter([], [], marker="o", color="C0", label="onnxruntime")
    ax.scatter([], [], marker="s", color="C1", label="OpenVINO")
    ax.set_xlabel(f"latency at batch 1, ms ({args.threads} CPU threads, {args.size}x{args.size})")
    ax.set_ylabel("COCO128 bbox mAP (training images)")
    ax.set_title("FCOS / resnet10t exported whole (NMS in the graph)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "map_vs_latency.png", dpi=120)
    if not args.no_ledger:
        command = "python scripts/detection_cpu_figures.py " + shlex.join(sys.argv[1:])
        raw_json = json.loads(json.dumps(raw, default=str))
        print(f"ledger: {record('detection-cpu', rows, raw_json, command, 'scripts/detection_cpu_figures.py', args.ledger_dir)}")


if __name__ == "__main__":
    main()
