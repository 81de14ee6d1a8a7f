"""gpu_bench sections ``detection``: the detection recipe (recipes/detection_coco128.yaml) on
coco128, a pipeline check (train, mAP); ``detection_compressed``: a detector pruned inside,
fine-tuned distilled and exported whole in INT8 (recipes/detection_compressed_coco128.yaml),
mAP and the whole detector's latency."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import yaml

from ..benchmarks.registry import fmt, run_recipe, summaries
from ..config import apply_overrides

__all__ = ["detection_section", "detection_markdown", "detection_compressed_section", "detection_compressed_markdown"]


def _pycocotools_path() -> str | None:
    """A folder holding pycocotools for the recipe's process: none needed if this Python has it,
    else the wheel(s) in .data/wheels unpacked to .data/pylib (a wheel is a zip; nothing is
    installed into the machine's Python)."""
    import importlib.util
    import zipfile

    if importlib.util.find_spec("pycocotools") is not None:
        return None
    wheels = sorted(Path(".data/wheels").glob("pycocotools-*.whl"))
    if not wheels:
        raise RuntimeError("pycocotools is missing: put its wheel in .data/wheels (see README, Detection)")
    target = Path(".data/pylib")
    for wheel in wheels:
        zipfile.ZipFile(wheel).extractall(target)
    return str(target.resolve())


def _coco_and_env(args: argparse.Namespace) -> tuple[Path, dict[str, str]]:
    """The coco128 folder (unpacked from ``args.coco`` when that is a .tgz) and the environment of
    the recipe's process (pycocotools from .data/wheels if this Python lacks it; this process
    gets it too: the compressed section evaluates exports itself)."""
    import sys
    import tarfile

    coco = Path(args.coco)
    if coco.suffix == ".tgz":
        if not (Path(".data") / "coco128").is_dir():
            with tarfile.open(coco) as tar:
                tar.extractall(".data", filter="data")
        coco = Path(".data") / "coco128"
    env = dict(os.environ)
    extra = _pycocotools_path()
    if extra:
        env["PYTHONPATH"] = os.pathsep.join([extra, env.get("PYTHONPATH", "")])
        if extra not in sys.path:
            sys.path.insert(0, extra)
    return coco, env


def detection_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """recipes/detection_coco128.yaml: Faster R-CNN overfitting coco128 (target bbox mAP@0.5 > 0.5)."""
    coco, env = _coco_and_env(args)
    recipe = yaml.safe_load(Path("recipes/detection_coco128.yaml").read_text())
    recipe["stages"] = [s for s in recipe["stages"] if s["type"] != "export_detection"]  # the CPU tests cover it
    for s in recipe["stages"]:
        s["data"]["root"] = str(coco)
    if getattr(args, "toy", False):
        recipe.update(device="cpu", threads=1)
        train, ev = recipe["stages"]
        train.update(epochs=1, warmup_steps=0, log_every=1, min_size=64, max_size=96, out_channels=32,
                     detector_options={"representation_size": 64, "box_batch_size_per_image": 32})
        train["data"].update(limit_images=2, batch_size=2, num_workers=0)
        ev["data"].update(limit_images=2, batch_size=2)
    recipe = apply_overrides(recipe, getattr(args, "detection_set", []))
    run_dir = Path(args.runs) / f"detection-{args.stamp}"
    code, wall = run_recipe(recipe, run_dir, args, env=env)
    s = summaries(run_dir)
    t, e = s.get("train_detection"), s.get("eval_detection")
    if t is None or e is None:
        return [{"error": f"exit {code}", "wall_s": wall}]
    row = {"detector": t["detector"], "backbone": t["backbone"], "steps": t["steps"],
           "train_time_s": t["train_time_s"], "train_img_per_s": t["train_img_per_s"],
           "loss_first": t["loss_first"], "loss_last": t["loss_last"], "bbox_mAP": e["bbox_mAP"],
           "bbox_mAP50": e["bbox_mAP50"], "target_met": e["bbox_mAP50"] > 0.5, "wall_s": wall, "exit_code": code}
    print(f"  detection: bbox mAP@0.5 {row['bbox_mAP50']:.3f} (target > 0.5) after {row['steps']} steps", flush=True)
    return [row]


def detection_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| detector | backbone | steps | train time (s) | img/s | loss first -> last | bbox mAP | mAP@0.5 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| failed: {r['error']} | | | | | | | |")
        else:
            lines.append(f"| {r['detector']} | {r['backbone']} | {r['steps']} | {r['train_time_s']:.1f} | "
                         f"{r['train_img_per_s']:.1f} | {r['loss_first']:.2f} -> {r['loss_last']:.2f} | "
                         f"{r['bbox_mAP']:.3f} | {r['bbox_mAP50']:.3f} |")
    return lines


def detection_compressed_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """recipes/detection_compressed_coco128.yaml: FCOS/resnet18 at 384 px trained, pruned 0.5,
    fine-tuned distilled, exported whole in INT8; then the dense and pruned detectors exported
    whole in fp32 too, their mAP from onnxruntime, and the whole detectors timed: PyTorch on the
    GPU (WholeDetector, NMS included) at batch 1 and 16, onnxruntime on this machine's CPU at
    batch 1."""
    coco, env = _coco_and_env(args)
    recipe = yaml.safe_load(Path("recipes/detection_compressed_coco128.yaml").read_text())
    for s in recipe["stages"]:
        if "data" in s:
            s["data"]["root"] = str(coco)
    if getattr(args, "toy", False):
        recipe.update(device="cpu", threads=1)
        recipe["model"]["name"] = "resnet10t"
        for s in recipe["stages"]:
            if "data" in s:
                s["data"].update(limit_images=2, batch_size=2, num_workers=0)
        train, finetune = recipe["stages"][0], recipe["stages"][3]
        # 96 px, not 64: at 64 the stride-64 level is 1x1, where GroupNorm(32, 32) in the heads refuses batch 1
        train.update(epochs=1, warmup_steps=0, log_every=1, min_size=96, max_size=96, fixed_size=[96, 96],
                     out_channels=32)
        finetune.update(epochs=1, warmup_steps=0, log_every=1)
        recipe["stages"][5]["calib_images"] = 2
    recipe = apply_overrides(recipe, getattr(args, "detection_compressed_set", []))
    run_dir = Path(args.runs) / f"detection_compressed-{args.stamp}"
    code, wall = run_recipe(recipe, run_dir, args, env=env)
    stages = {p.parent.name: json.loads(p.read_text()) for p in sorted(run_dir.glob("*/summary.json"))}
    names = sorted(stages)
    if len(names) < 6:
        return [{"error": f"exit {code} after {len(names)} of 6 stages", "wall_s": wall}]
    train, dense_eval, pruned, _, pruned_eval, exported = (stages[n] for n in names[:6])
    dense_dir, pruned_dir = (run_dir / names[i] / "detector" for i in (0, 3))
    size = recipe["stages"][0]["fixed_size"]
    rows = []
    for name, d, ev in (("dense", dense_dir, dense_eval), ("pruned 0.5", pruned_dir, pruned_eval)):
        fp32 = _export_map(d, run_dir / f"export-{name.split()[0]}-fp32", coco, recipe, size)
        timing = _time_whole(d, size, args, onnx=Path(fp32["onnx"]))
        rows.append({"detector": name, "backbone": train["backbone"], "size": size, "bbox_mAP": ev["bbox_mAP"],
                     "bbox_mAP_fp32_onnx": fp32["map"]["exported"], **timing,
                     "params_m": pruned["params_m_after"] if name != "dense" else pruned["params_m_before"]})
    rows.append({"detector": "pruned 0.5 int8", "backbone": train["backbone"], "size": size,
                 "bbox_mAP": exported["map"]["exported"], "bbox_mAP_fp32_onnx": None,
                 **_time_whole(pruned_dir, size, args, onnx=Path(exported["onnx"]), gpu=False),
                 "params_m": pruned["params_m_after"]})
    for r in rows:
        r.update(train_time_s=train["train_time_s"], wall_s=wall, exit_code=code)
    print(f"  detection_compressed: mAP dense {rows[0]['bbox_mAP']:.3f}, pruned {rows[1]['bbox_mAP']:.3f}, "
          f"pruned int8 (onnxruntime) {rows[2]['bbox_mAP']:.3f}", flush=True)
    return rows


def _export_map(detector_dir: Path, out: Path, coco: Path, recipe: dict[str, Any], size: list[int]) -> dict[str, Any]:
    from ..data.coco import CocoDataConfig
    from .stages import ExportDetectionConfig, export_whole_detector

    data = dict(recipe["stages"][-1]["data"])
    cfg = ExportDetectionConfig(size=list(size), data=CocoDataConfig(**data))
    return export_whole_detector(detector_dir, out, cfg)


def _time_whole(detector_dir: Path, size: list[int], args: argparse.Namespace, onnx: Path,
                gpu: bool = True) -> dict[str, Any]:
    """Median ms per call of the whole detector: PyTorch on the GPU (batch 1 and 16) where there
    is one, and onnxruntime on the CPU at batch 1 (the exported file ``onnx``)."""
    import statistics
    import time

    import numpy as np
    import torch

    from .io import load_detector
    from .whole import WholeDetector, settings_of

    out: dict[str, Any] = {}
    if gpu and torch.cuda.is_available() and not getattr(args, "toy", False):
        detector, _ = load_detector(detector_dir)
        whole = WholeDetector(detector, (size[0], size[1]), settings_of(detector)).eval().cuda()
        for b in (1, 16):
            x = torch.rand(b, 3, *size, device="cuda")
            times = []
            with torch.no_grad():
                for i in range(25):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    whole(x)
                    end.record()
                    torch.cuda.synchronize()
                    if i >= 5:
                        times.append(start.elapsed_time(end))
            out[f"torch_gpu_ms_b{b}"] = statistics.median(times)
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
    for _ in range(3):
        session.run(None, {"images": x})
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        session.run(None, {"images": x})
        times.append((time.perf_counter() - t0) * 1e3)
    out["ort_cpu_ms_b1"] = statistics.median(times)
    return out


def detection_compressed_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| detector | backbone | size | params (M) | bbox mAP | mAP fp32 ONNX | PyTorch GPU ms b1 | "
             "PyTorch GPU ms b16 | onnxruntime CPU ms b1 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| failed: {r['error']} | | | | | | | | |")
            continue
        cells = [r["detector"], r["backbone"], "x".join(map(str, r["size"])), f"{r['params_m']:.2f}",
                 f"{r['bbox_mAP']:.3f}", fmt(r.get("bbox_mAP_fp32_onnx"), ".3f"), fmt(r.get("torch_gpu_ms_b1"), ".2f"),
                 fmt(r.get("torch_gpu_ms_b16"), ".2f"), f"{r['ort_cpu_ms_b1']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
