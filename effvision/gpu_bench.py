"""The GPU figures behind scripts/gpu_bench.sh: sections that each write results/<name>.json,
then one markdown table. Later features add sections to ``SECTIONS``.

    python -m effvision.gpu_bench --data .data/cifar10.tgz --out results [--sections a,b]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .bench import benchmark
from .optim.gpu_section import galore_markdown, galore_section
from .runinfo import run_environment

__all__ = ["SECTIONS", "main"]

# Inference models (baselines.md's table); compiled too where the baseline has a compiled figure.
INFERENCE_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "vit_base_patch16_224", "efficientvit_b1",
                    "mobilenetv3_large_100", "mobilenetv4_conv_small", "resnet50", "convnext_tiny")
COMPILED_MODELS = ("deit_small_patch16_224", "efficientvit_b1", "resnet50")


def inference(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name in INFERENCE_MODELS:
        for backend in ("torch", "compile") if name in COMPILED_MODELS else ("torch",):
            r = benchmark(name, backend, "cuda", 256, img_size=224, warmup=5, iters=15, amp="bf16",
                          channels_last=True)
            print(f"  {name:28s} {backend:8s} {r['img_per_s']:9.0f} img/s", flush=True)
            rows.append(r)
    return rows


def cifar10(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The CIFAR-10 reference recipe, and any variants given with --cifar-variant."""
    rows = []
    variants = [("reference", [])] + [(v, v.split()) for v in args.cifar_variant]
    for label, sets in variants:
        run_dir = Path(args.runs) / f"cifar10-{args.stamp}-{len(rows)}"  # fresh per invocation: no stale skips
        cmd = [sys.executable, "-m", "effvision", "run", "recipes/cifar10_vit_tiny.yaml", "--out", str(run_dir),
               "--set", f"data.root={args.data}"]
        for s in sets:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd)
        wall = time.perf_counter() - t0
        summary_path = run_dir / "01-train" / "summary.json"  # the figure: training, whatever later stages did
        if not summary_path.is_file():
            rows.append({"variant": label, "error": f"exit {proc.returncode}", "wall_s": wall})
            continue
        s = json.loads(summary_path.read_text())
        rows.append({"variant": label, "model": s.get("model"), "epochs": s.get("epochs"), "top1": s.get("top1"),
                     "train_time_s": s.get("train_time_s"), "train_img_per_s": s.get("train_img_per_s"),
                     "gmacs": s.get("gmacs"), "params_m": s.get("params_m"), "wall_s": wall,
                     "exit_code": proc.returncode})
        print(f"  cifar10 {label}: {s.get('top1')}% in {s.get('train_time_s')} s", flush=True)
    return rows


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


def detection(args: argparse.Namespace) -> list[dict[str, Any]]:
    """recipes/detection_coco128.yaml: Faster R-CNN overfitting coco128 (target bbox mAP@0.5 > 0.5)."""
    import os
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
    run_dir = Path(args.runs) / f"detection-{args.stamp}"
    cmd = [sys.executable, "-m", "effvision", "run", "recipes/detection_coco128.yaml", "--out", str(run_dir),
           "--set", f"stages.0.data.root={coco}", "--set", f"stages.1.data.root={coco}"]
    for item in args.detection_set:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    wall = time.perf_counter() - t0
    train_path, eval_path = run_dir / "01-train_detection" / "summary.json", run_dir / "02-eval_detection" / "summary.json"
    if not (train_path.is_file() and eval_path.is_file()):
        return [{"error": f"exit {proc.returncode}", "wall_s": wall}]
    t, e = json.loads(train_path.read_text()), json.loads(eval_path.read_text())
    row = {"detector": t["detector"], "backbone": t["backbone"], "steps": t["steps"],
           "train_time_s": t["train_time_s"], "train_img_per_s": t["train_img_per_s"],
           "loss_first": t["loss_first"], "loss_last": t["loss_last"], "bbox_mAP": e["bbox_mAP"],
           "bbox_mAP50": e["bbox_mAP50"], "target_met": e["bbox_mAP50"] > 0.5, "wall_s": wall,
           "exit_code": proc.returncode}
    print(f"  detection: bbox mAP@0.5 {row['bbox_mAP50']:.3f} (target > 0.5) after {row['steps']} steps", flush=True)
    return [row]
def quantize(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .compress.quantize.gpu_section import quantize_section

    return quantize_section(args)


PRUNE_CRITERIA = ("taylor", "l2", "obd")


def prune_distill(args: argparse.Namespace) -> list[dict[str, Any]]:
    """recipes/cifar10_vit_prune_distill.yaml (criterion taylor), then l2 and obd pruned from the
    same dense model: accuracy at 50% MACs and bf16 img/s, pruned vs dense."""
    import copy

    import yaml

    rows = []
    first = Path(args.runs) / f"prune-{args.stamp}-taylor"
    recipe = yaml.safe_load(Path("recipes/cifar10_vit_prune_distill.yaml").read_text())
    recipe["data"]["root"] = args.data
    for criterion in PRUNE_CRITERIA:
        run_dir = Path(args.runs) / f"prune-{args.stamp}-{criterion}"
        r = copy.deepcopy(recipe)
        if criterion != PRUNE_CRITERIA[0]:  # reuse the first run's dense model as start and teacher
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
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(r, sort_keys=False))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "effvision", "run", str(path), "--out", str(run_dir)])
        row: dict[str, Any] = {"criterion": criterion, "exit_code": proc.returncode, "wall_s": time.perf_counter() - t0}
        for d in sorted(run_dir.glob("*/summary.json")):
            s = json.loads(d.read_text())
            kind = s.get("stage")
            if kind == "train":
                row.update(dense_top1=s.get("top1"), dense_train_s=s.get("train_time_s"))
            elif kind == "prune":
                row.update(macs_fraction=s.get("macs_fraction"), params_fraction=s.get("params_fraction"))
            elif kind == "finetune":
                row.update(pruned_top1=s.get("top1"), finetune_s=s.get("train_time_s"))
            elif kind == "bench":
                row.update(pruned_img_s=s["results"][0]["img_per_s"], speedup=s.get("speedup_vs_baseline", {}).get("torch"))
        rows.append(row)
        print(f"  prune_distill {criterion}: {row}", flush=True)
    return rows


def token_drop(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .tokens.gpu_section import token_drop_section

    return token_drop_section(args)


SECTIONS: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {
    "inference": inference,
    "cifar10": cifar10,
    "detection": detection,
    "galore": galore_section,
    "quantize": quantize,
    "prune_distill": prune_distill,
    "token_drop": token_drop,
}


def markdown(results: dict[str, list[dict[str, Any]]], env: dict[str, Any]) -> str:
    gpu = env["hardware"].get("gpu", {}).get("name", "no GPU")
    lines = ["# effvision GPU figures\n", f"GPU: {gpu}; torch {env['versions'].get('torch')}, "
             f"timm {env['versions'].get('timm')}; command: scripts/gpu_bench.sh\n"]
    if "inference" in results:
        lines += ["## Inference (bf16, batch 256, 224x224, channels_last, median of 15)\n",
                  "| model | backend | img/s | p50 ms |", "|---|---|---|---|"]
        lines += [f"| {r['target']} | {r['backend']} | {r['img_per_s']:,.0f} | {r['latency_ms_p50']:.2f} |"
                  for r in results["inference"]]
        lines.append("")
    if "cifar10" in results:
        lines += ["## CIFAR-10 time to accuracy (recipes/cifar10_vit_tiny.yaml)\n",
                  "| variant | model | epochs | train time (s) | img/s | test top-1 |", "|---|---|---|---|---|---|"]
        for r in results["cifar10"]:
            if "error" in r:
                lines.append(f"| {r['variant']} | failed: {r['error']} | | | | |")
            else:
                top1 = f"{r['top1']:.2f}%" if r.get("top1") is not None else "n/a"
                lines.append(f"| {r['variant']} | {r['model']} | {r['epochs']} | {r['train_time_s']:.1f} | "
                             f"{r['train_img_per_s']:,.0f} | {top1} |")
        lines.append("")
    if "detection" in results:
        lines += ["## Detection pipeline check (recipes/detection_coco128.yaml, train and eval on coco128)\n",
                  "| detector | backbone | steps | train time (s) | img/s | loss first -> last | bbox mAP | mAP@0.5 |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results["detection"]:
            if "error" in r:
                lines.append(f"| failed: {r['error']} | | | | | | | |")
            else:
                lines.append(f"| {r['detector']} | {r['backbone']} | {r['steps']} | {r['train_time_s']:.1f} | "
                             f"{r['train_img_per_s']:.1f} | {r['loss_first']:.2f} -> {r['loss_last']:.2f} | "
                             f"{r['bbox_mAP']:.3f} | {r['bbox_mAP50']:.3f} |")
        lines.append("")
    if results.get("galore"):
        lines += galore_markdown(results["galore"])
    if "quantize" in results:
        lines += ["## Quantization (deit_tiny, effvision.compress.quantize)\n", "| what | result |", "|---|---|"]
        lines += [f"| {r['what']} | {', '.join(f'{k}={v}' for k, v in r.items() if k != 'what')} |"
                  for r in results["quantize"]]
    if "prune_distill" in results:
        lines += ["## Prune + distill, CIFAR-10 (recipes/cifar10_vit_prune_distill.yaml, 50% MACs)\n",
                  "| criterion | dense top-1 | pruned top-1 | MACs | bf16 img/s pruned | speedup vs dense |",
                  "|---|---|---|---|---|---|"]
        for r in results["prune_distill"]:
            lines.append(f"| {r['criterion']} | {r.get('dense_top1', '')} | {r.get('pruned_top1', 'failed')} | "
                         f"{r.get('macs_fraction', '')} | {r.get('pruned_img_s', '')} | {r.get('speedup', '')} |")
        lines.append("")
    if "token_drop" in results:
        from .tokens.gpu_section import token_drop_markdown

        lines += token_drop_markdown(results["token_drop"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=".data/cifar10.tgz", help="CIFAR-10 ImageFolder or its .tar.gz")
    p.add_argument("--out", help="results folder (default results/<timestamp>; an existing folder is refused)")
    p.add_argument("--runs", default="runs/gpu_bench")
    p.add_argument("--coco", default=".data/coco128.tgz", help="coco128 folder or its .tgz (detection section)")
    p.add_argument("--detection-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the detection recipe, e.g. stages.0.epochs=100")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--cifar-variant", action="append", default=[],
                   help="extra CIFAR-10 run: space-separated --set overrides, e.g. 'model.name=convvit_tiny_32'")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU available", file=sys.stderr)
        return 2
    args.stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"results/{args.stamp}")
    if out.exists() and any(out.iterdir()):
        print(f"gpu_bench: {out} exists and is not empty; choose another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = run_environment()
    (out / "environment.json").write_text(json.dumps(env, indent=2))
    results = {}
    for name in args.sections.split(","):
        if name not in SECTIONS:
            print(f"gpu_bench: unknown section '{name}' (known: {', '.join(SECTIONS)})", file=sys.stderr)
            return 2
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = SECTIONS[name](args)
        except Exception as e:  # one broken section must not hide the others' figures
            print(f"section {name} failed: {type(e).__name__}: {e}", flush=True)
            results[name] = []
        (out / f"{name}.json").write_text(json.dumps(results[name], indent=2))
        print(f"== {name} took {time.perf_counter() - t0:.0f} s", flush=True)
    (out / "gpu_bench.md").write_text(markdown(results, env))
    print(markdown(results, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
