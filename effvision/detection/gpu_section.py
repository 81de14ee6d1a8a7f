"""gpu_bench section ``detection``: the detection recipe (recipes/detection_coco128.yaml) on
coco128, a pipeline check (train, mAP, backbone export)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml

from ..benchmarks.registry import run_recipe, summaries
from ..config import apply_overrides

__all__ = ["detection_section", "detection_markdown"]


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


def detection_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """recipes/detection_coco128.yaml: Faster R-CNN overfitting coco128 (target bbox mAP@0.5 > 0.5)."""
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
