"""gpu_bench sections that live nowhere else (inference, cifar10, detection, prune_distill), and
the helpers every section may use: the time it has left, the device, toy-size recipes.

A section is ``def <name>_section(args) -> list[dict]`` plus ``def <name>_markdown(rows) ->
list[str]``; ``effvision.gpu_bench`` registers it. ``args`` carries ``data`` (CIFAR-10 folder or
.tar.gz), ``coco``, ``runs`` (folder for run dirs), ``stamp``, ``toy`` (CPU, toy sizes: what the
tests run), ``budget_s`` (this section's share of the call, seconds) and ``deadline`` (time.time()
by which it must be done; ``seconds_left(args)``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .config import apply_overrides

__all__ = ["seconds_left", "device_of", "derive_recipe", "run_recipe", "inference_section", "inference_markdown",
           "cifar10_section", "cifar10_markdown", "steady_img_per_s", "detection_section", "detection_markdown",
           "prune_distill_section", "prune_distill_markdown"]


def seconds_left(args: argparse.Namespace) -> float:
    """Seconds until this section's deadline (infinite when called outside the runner)."""
    deadline = getattr(args, "deadline", None)
    return math.inf if deadline is None else deadline - time.time()


def device_of(args: argparse.Namespace) -> str:
    return "cpu" if getattr(args, "toy", False) else "cuda"


def _toy_train_stage(stage: dict[str, Any]) -> None:
    """One tiny epoch, eager, fp32-friendly: what a CPU test can afford."""
    stage["epochs"] = 1
    stage.setdefault("scheduler", {})["warmup_epochs"] = 0.5
    stage.update(compile=False, channels_last=False, log_every=1)
    stage.get("optimizer", {}).get("kwargs", {}).pop("fused", None)  # fused AdamW is CUDA-only


def derive_recipe(path: str | Path, args: argparse.Namespace, keep: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The recipe at ``path`` with ``data.root = args.data``, only the stage types in ``keep``,
    and under ``args.toy`` shrunk to a CPU slice (64 training images, one epoch)."""
    recipe = yaml.safe_load(Path(path).read_text())
    recipe["data"]["root"] = str(args.data)
    if keep is not None:
        recipe["stages"] = [s for s in recipe["stages"] if s["type"] in keep]
    if getattr(args, "toy", False):
        recipe.update(device="cpu", threads=1)  # GaLore's SVD crawls with 2 contending OpenMP threads
        recipe["data"].update(limit_train=64, limit_eval=32, batch_size=32, eval_batch_size=32)
        for s in recipe["stages"]:
            if s["type"] in ("train", "finetune"):
                _toy_train_stage(s)
            elif s["type"] == "prune":
                s["calib_batches"] = 1
            elif s["type"] == "bench":
                s.update(device="cpu", batch_size=8, iters=2, warmup=1)
    return recipe


def run_recipe(recipe: dict[str, Any], run_dir: Path, args: argparse.Namespace,
               env: dict[str, str] | None = None) -> tuple[int, float]:
    """``effvision run`` on a written copy of ``recipe`` (beside ``run_dir``), stopped at the
    section's deadline. Returns (exit code, wall seconds); a run stopped at the deadline is 124."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    left = seconds_left(args)
    t0 = time.perf_counter()
    try:
        code = subprocess.run([sys.executable, "-m", "effvision", "run", str(path), "--out", str(run_dir)],
                              env=env, timeout=None if math.isinf(left) else max(left, 1.0)).returncode
    except subprocess.TimeoutExpired:
        print(f"  {run_dir.name}: stopped at the section's deadline", flush=True)
        code = 124
    return code, time.perf_counter() - t0


def _summaries(run_dir: Path) -> dict[str, dict[str, Any]]:
    """stage type -> summary.json of each finished stage."""
    out = {}
    for p in sorted(run_dir.glob("*/summary.json")):
        s = json.loads(p.read_text())
        out[s.get("stage", p.parent.name.split("-", 1)[-1])] = s
    return out


def _fmt(v: Any, spec: str = "", none: str = "") -> str:
    return none if v is None else format(v, spec)


# --------------------------------------------------------------------------------------------- inference
INFERENCE_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "vit_base_patch16_224", "efficientvit_b1",
                    "mobilenetv3_large_100", "mobilenetv4_conv_small", "resnet50", "convnext_tiny")
COMPILED_MODELS = ("deit_small_patch16_224", "efficientvit_b1", "resnet50")
# baselines.md, plain timm on one H100 (bf16, batch 256, 224x224, channels_last): eager (compiled)
BASELINE_H100 = {"deit_tiny_patch16_224": "32,112", "deit_small_patch16_224": "18,983 (23,115)",
                 "vit_base_patch16_224": "8,752", "efficientvit_b1": "16,083", "mobilenetv3_large_100": "29,856",
                 "mobilenetv4_conv_small": "42,858", "resnet50": "12,753", "convnext_tiny": "7,568"}
COMPILE_S = 40  # a compile of one of these models took 19-30 s on the H100: skip it with less time left


def inference_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Eager (and compiled) bf16 inference of baselines.md's models, as many as the budget allows."""
    from .bench import benchmark

    toy = getattr(args, "toy", False)
    models = ("vit_micro_patch4_32",) if toy else INFERENCE_MODELS
    rows: list[dict[str, Any]] = []
    for name in models:
        for backend in ("torch", "compile") if name in COMPILED_MODELS else ("torch",):
            if seconds_left(args) < (COMPILE_S if backend == "compile" else 5):
                print(f"  inference: {name} {backend} skipped (budget)", flush=True)
                continue
            if toy:
                r = benchmark(name, backend, "cpu", 2, img_size=32, warmup=1, iters=2, amp="off")
            else:
                r = benchmark(name, backend, "cuda", 256, img_size=224, warmup=5, iters=15, amp="bf16",
                              channels_last=True)
            print(f"  {name:28s} {backend:8s} {r['img_per_s']:9.0f} img/s", flush=True)
            rows.append(r)
    return rows


def inference_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | eager img/s | compiled img/s | baselines.md eager (compiled), H100 |", "|---|---|---|---|"]
    by_model: dict[str, dict[str, float]] = {}
    for r in rows:
        by_model.setdefault(r["target"], {})[r["backend"]] = r["img_per_s"]
    for name, b in by_model.items():
        lines.append(f"| {name} | {_fmt(b.get('torch'), ',.0f')} | {_fmt(b.get('compile'), ',.0f')} | "
                     f"{BASELINE_H100.get(name, '')} |")
    return lines


# --------------------------------------------------------------------------------------------- cifar10
CIFAR_RECIPE = "recipes/cifar10_vit_tiny.yaml"


# issue 2's gap: convvit_tiny_32 trained at ~22k img/s in effvision vs 41.8k in baselines.md's
# script. Short runs (3 epochs) read the steady rate (windows after the first: no compile inside)
# of the recipe's settings and of the baseline's (no drop-path, no qk_norm, no label smoothing).
THROUGHPUT_VARIANTS = (
    ("convvit_tiny_32, recipe settings", ["model.name=convvit_tiny_32"]),
    ("convvit_tiny_32, baseline settings", ["model.name=convvit_tiny_32", "model.kwargs={}",
                                            "stages.0.label_smoothing=0.0", "stages.0.grad_clip=null"]),
)
THROUGHPUT_RUN_S = 60  # a 3-epoch run with start-up, decode and compile, estimated


def steady_img_per_s(stage_dir: Path) -> float | None:
    """Median img/s of the logged windows after the first (which holds the compile)."""
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rates = [json.loads(line)["img_per_s"] for line in path.read_text().splitlines() if '"img_per_s"' in line]
    rest = sorted(rates[1:])
    return rest[len(rest) // 2] if rest else None


def _cifar_row(label: str, run_dir: Path, code: int, wall: float) -> dict[str, Any]:
    s = _summaries(run_dir).get("train")
    if s is None:
        return {"variant": label, "error": f"exit {code}", "wall_s": wall}
    return {"variant": label, "model": s.get("model"), "epochs": s.get("epochs"), "top1": s.get("top1"),
            "train_time_s": s.get("train_time_s"), "train_img_per_s": s.get("train_img_per_s"),
            "steady_img_per_s": steady_img_per_s(run_dir / "01-train"), "gmacs": s.get("gmacs"),
            "params_m": s.get("params_m"), "wall_s": wall, "exit_code": code}


def cifar10_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The CIFAR-10 reference recipe's train stage (the figure: accuracy and time of training;
    eval/export are checked on the CPU by the tests), then the throughput comparison and any
    --cifar-variant while time is left."""
    toy = getattr(args, "toy", False)
    short = ["stages.0.epochs=3", "stages.0.scheduler.warmup_epochs=1", "stages.0.log_every=20"]
    runs = [("reference", [], "time to accuracy")]
    runs += [(label, sets + ([] if toy else short), "throughput") for label, sets in THROUGHPUT_VARIANTS[:1 if toy else 2]]
    runs += [(v, v.split(), "variant") for v in getattr(args, "cifar_variant", [])]
    rows: list[dict[str, Any]] = []
    for i, (label, sets, part) in enumerate(runs):
        need = THROUGHPUT_RUN_S if part == "throughput" else 150
        if i and seconds_left(args) < need:
            rows.append({"variant": label, "part": part, "skipped": "budget"})
            print(f"  cifar10 {label}: skipped ({seconds_left(args):.0f} s left, needs ~{need} s)", flush=True)
            continue
        recipe = apply_overrides(derive_recipe(CIFAR_RECIPE, args, keep=("train",)), sets)
        run_dir = Path(args.runs) / f"cifar10-{args.stamp}-{i}"  # fresh per invocation: no stale skips
        code, wall = run_recipe(recipe, run_dir, args)
        rows.append({**_cifar_row(label, run_dir, code, wall), "part": part})
        r = rows[-1]
        print(f"  cifar10 {label}: {r.get('top1')}% in {r.get('train_time_s')} s, "
              f"steady {r.get('steady_img_per_s')} img/s", flush=True)
    return rows


def cifar10_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| run | model | epochs | train time (s) | img/s (all / steady) | test top-1 |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['variant']} | {'failed: ' + r['error'] if 'error' in r else 'skipped (budget)'} | | | | |")
        else:
            lines.append(f"| {r['variant']} | {r['model']} | {r['epochs']} | {_fmt(r['train_time_s'], '.1f')} | "
                         f"{_fmt(r['train_img_per_s'], ',.0f')} / {_fmt(r.get('steady_img_per_s'), ',.0f', 'n/a')} | "
                         f"{_fmt(r['top1'], '.2f', 'n/a')}% |")
    return lines


# --------------------------------------------------------------------------------------------- detection
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
    s = _summaries(run_dir)
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


# --------------------------------------------------------------------------------------------- prune_distill
PRUNE_RECIPE = "recipes/cifar10_vit_prune_distill.yaml"
PRUNE_CRITERIA = ("taylor", "l2", "obd")
# Full recipe estimate on one H100-class GPU: 40 + 20 epochs at ~20k img/s (2.5 s/epoch), plus
# ~60 s of decode, compiles and pruning. With less time the epochs shrink in proportion.
EPOCH_S, OVERHEAD_S = 2.5, 60.0


def _fit_epochs(recipe: dict[str, Any], budget_s: float) -> float:
    """Scale train/finetune epochs so the run fits ``budget_s``; returns the factor (1 = full)."""
    stages = [s for s in recipe["stages"] if s["type"] in ("train", "finetune")]
    full = OVERHEAD_S + EPOCH_S * sum(s["epochs"] for s in stages)
    factor = min(1.0, max(budget_s - OVERHEAD_S, 0.0) / (full - OVERHEAD_S))
    if factor < 1.0:
        for s in stages:
            s["epochs"] = max(2, int(s["epochs"] * factor))
            s["scheduler"]["warmup_epochs"] = min(s["scheduler"].get("warmup_epochs", 0), s["epochs"] / 4)
    return factor


def prune_distill_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """recipes/cifar10_vit_prune_distill.yaml (criterion taylor), then l2 and obd pruned from the
    same dense model while time is left: accuracy at 50% MACs and bf16 img/s, pruned vs dense.
    With less time than the full recipe needs, its epochs shrink (the rows say by how much)."""
    toy = getattr(args, "toy", False)
    criteria = PRUNE_CRITERIA[:2] if toy else PRUNE_CRITERIA
    base = derive_recipe(PRUNE_RECIPE, args, keep=("train", "prune", "finetune", "bench"))  # the CPU tests run eval/export
    factor = 1.0 if toy else _fit_epochs(base, 0.7 * seconds_left(args))  # the other criteria share the rest
    first = Path(args.runs) / f"prune-{args.stamp}-{criteria[0]}"
    rows: list[dict[str, Any]] = []
    for criterion in criteria:
        r = copy.deepcopy(base)
        if criterion != criteria[0]:  # reuse the first run's dense model as start and teacher
            if seconds_left(args) < 30 or not (first / "01-train" / "model").is_dir():
                rows.append({"criterion": criterion, "skipped": "budget" if seconds_left(args) < 30 else "no dense model"})
                continue
            dense = str((first / "01-train" / "model").resolve())
            r["model"]["init_from"] = dense
            r["stages"] = [s for s in r["stages"] if s["type"] != "train"]
            for s in r["stages"]:
                if s["type"] == "finetune":
                    s["distill"]["teacher"] = dense
                if s["type"] == "bench":
                    s.pop("baseline", None)
        for s in r["stages"]:
            if s["type"] == "prune":
                s["criterion"] = criterion
        run_dir = Path(args.runs) / f"prune-{args.stamp}-{criterion}"
        code, wall = run_recipe(r, run_dir, args)
        row: dict[str, Any] = {"criterion": criterion, "exit_code": code, "wall_s": wall, "epochs_factor": factor}
        s = _summaries(run_dir)
        if "train" in s:
            row.update(dense_top1=s["train"].get("top1"), dense_train_s=s["train"].get("train_time_s"))
        if "prune" in s:
            row.update(macs_fraction=s["prune"].get("macs_fraction"), params_fraction=s["prune"].get("params_fraction"))
        if "finetune" in s:
            row.update(pruned_top1=s["finetune"].get("top1"), finetune_s=s["finetune"].get("train_time_s"))
        if "bench" in s:
            row.update(pruned_img_s=s["bench"]["results"][0]["img_per_s"],
                       speedup=s["bench"].get("speedup_vs_baseline", {}).get("torch"))
        rows.append(row)
        print(f"  prune_distill {criterion}: {row}", flush=True)
    return rows


def prune_distill_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| criterion | epochs (of the recipe's) | dense top-1 | pruned top-1 | MACs | bf16 img/s pruned | "
             "speedup vs dense |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['criterion']} | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(f"| {r['criterion']} | {r.get('epochs_factor', 1.0):.0%} | {_fmt(r.get('dense_top1'), '.2f')} | "
                     f"{_fmt(r.get('pruned_top1'), '.2f', 'failed')} | {_fmt(r.get('macs_fraction'), '.2f')} | "
                     f"{_fmt(r.get('pruned_img_s'), ',.0f')} | {_fmt(r.get('speedup'), '.2f')} |")
    return lines
