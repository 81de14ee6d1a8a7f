"""The effvision command line: run, check, eval, export, bench, models, and prune/quantize for a model dir.

Bad input (recipe, model, dataset, checkpoint, NaN loss, ...) prints one line and exits with
code 2; --debug shows the traceback instead.
"""
from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path
from typing import Any

from .engine.preemption import PREEMPTED_EXIT, Preempted
from .errors import EffVisionError

__all__ = ["main", "build_parser"]

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, quota, file size limit

EXPORT_FORMATS = {"onnx": "ONNX for onnxruntime and TensorRT (QDQ when quantized)",
                  "tensorrt": "ONNX plus a TensorRT engine (or build_engine.sh where TensorRT is missing)",
                  "openvino": "ONNX plus OpenVINO IR (model.xml/.bin; INT8 from the QDQ graph when quantized)"}


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run_recipe

    run_dir = run_recipe(args.recipe, args.out, args.set, args.resume)
    print(f"run directory: {run_dir}")
    return 0


def _run_generated(recipe: dict[str, Any], args: argparse.Namespace) -> int:
    """Run a recipe made by a command (prune, quantize); the run dir keeps it as recipe.yaml."""
    import tempfile

    import yaml

    from .pipeline import run_recipe

    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        run_dir = run_recipe(path, out, args.set, args.resume)
    print(f"run directory: {run_dir} (rerun or edit: effvision run {run_dir / 'recipe.yaml'} --out {run_dir})")
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from .one_stage import model_dir_recipe

    ratios = {k: getattr(args, k) for k in ("ratio", "heads", "mlp", "width", "channels") if getattr(args, k) is not None}
    if not ratios:
        raise EffVisionError("give --ratio (every kind) or per kind --heads/--mlp/--width/--channels")
    stages: list[dict[str, Any]] = [{"type": "prune", "criterion": args.criterion, **ratios}]
    if args.finetune_epochs:  # recover, distilled from the model as it was before pruning
        stages.append({"type": "finetune", "epochs": args.finetune_epochs,
                       "distill": {"teacher": str(Path(args.model_dir).resolve())}})
    stages.append({"type": "eval"})
    return _run_generated(model_dir_recipe(args.model_dir, stages, args.data, args.data_root, args.batch_size,
                                           args.device), args)


def _cmd_check(args: argparse.Namespace) -> int:
    from .stability import probe_stability

    report = probe_stability(args.recipe, args.set, args.steps, args.batch_size, args.amp)
    for k, v in report.summary().items():
        print(f"{k}: {v}")
    return 1 if report.problems else 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .one_stage import model_dir_recipe

    stages = [{"type": "quantize", "precision": args.precision, "target": args.target,
               "calib_batches": args.calib_batches}, {"type": "export", "format": "onnx"}]
    return _run_generated(model_dir_recipe(args.model_dir, stages, args.data, args.data_root, args.batch_size,
                                           args.device), args)


def _newest_model_dir(run_dir: Path) -> Path:
    from .engine.stage import stage_dirs

    for d in stage_dirs(run_dir):
        if (d / "model" / "model.json").is_file():
            return d / "model"
    raise EffVisionError(f"{run_dir} holds no trained model yet")


def _cmd_eval(args: argparse.Namespace) -> int:
    from .detection.commands import evaluate_target, exported_detector_file, newest_detector_dir
    from .pipeline import load_run_recipe
    from .engine.stage import resolve_device
    from .stages.evaluate import evaluate_model_dir

    run_dir = Path(args.run_dir)
    if exported_detector_file(run_dir) is not None or newest_detector_dir(run_dir) is not None:
        print(json.dumps(evaluate_target(run_dir, args.data, args.runtime, args.batch_size, args.limit_images),
                         indent=2))
        return 0
    recipe = load_run_recipe(run_dir)
    metrics = evaluate_model_dir(_newest_model_dir(run_dir), recipe, resolve_device(args.device), args.tta_flip)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from effvision.export import OnnxExportConfig, export_model_dir

    from .detection.commands import newest_detector_dir
    from .dirlock import DirLock
    from .models.io import read_spec

    src = Path(args.run_dir)
    detector_dir = newest_detector_dir(src)
    if detector_dir is not None:
        return _export_detector(detector_dir, args)
    if args.precision == "int8" or _detector_options(args):
        raise EffVisionError(f"{src} holds no detector: --precision int8, --size, --score-thresh, --nms-iou, "
                             f"--max-detections and --data are for detectors (quantize a classifier with "
                             f"`effvision quantize`)")
    model_dir = src if (src / "model.json").is_file() else _newest_model_dir(src)
    out = Path(args.out) if args.out else src / f"export-{args.format}-opset{args.opset}"
    deploy = (args.format == "tensorrt" or args.precision != "auto" or args.target is not None
              or args.trt_check != "auto" or args.ort_optimize)
    if args.dynamic_hw and (deploy or any(m["mode"] == "quantize" for m in read_spec(model_dir).modes)):
        raise EffVisionError("--dynamic-hw applies to the fp32 ONNX export; a quantized model and a --target, "
                             "--precision or --format tensorrt export keep the model's input size")
    with DirLock(out):  # one writer: a second export into the same folder stops at once
        if deploy:
            from effvision.export.deploy_cli import export_for_target

            result = export_for_target(model_dir, out, args)
        else:
            cfg = OnnxExportConfig(opset=args.opset, dynamic_batch=not args.static_batch, atol=args.atol,
                                   dynamic_hw=args.dynamic_hw)
            result = export_model_dir(model_dir, out, cfg, args.format)
    print(json.dumps(result, indent=2))
    return 0


def _detector_options(args: argparse.Namespace) -> list[str]:
    return [name for name in ("size", "score_thresh", "nms_iou", "max_detections", "data")
            if getattr(args, name) is not None]


def _export_detector(detector_dir: Path, args: argparse.Namespace) -> int:
    """A detector exports whole (image -> boxes, NMS in the graph), with the stage's checks."""
    from .detection.stages import ExportDetectionConfig, export_whole_detector
    from .dirlock import DirLock

    if args.target is not None or args.dynamic_hw or args.static_batch or args.ort_optimize or args.precision == "fp16":
        raise EffVisionError("a detector exports with --format, --precision fp32/int8, --size, --score-thresh, "
                             "--nms-iou, --max-detections and --data; --target, --dynamic-hw, --static-batch, "
                             "--ort-optimize and fp16 are for classifiers")
    size = None
    if args.size is not None:
        try:
            size = [int(v) for v in args.size.split(",")]
        except ValueError:
            size = []
        if len(size) != 2:
            raise EffVisionError(f"--size takes H,W (two integers), got '{args.size}'")
    from .data.coco import CocoDataConfig

    cfg = ExportDetectionConfig(format=args.format, precision="fp32" if args.precision == "auto" else args.precision,
                                size=size, opset=args.opset, score_thresh=args.score_thresh, nms_iou=args.nms_iou,
                                max_detections=args.max_detections,
                                data=CocoDataConfig(root=args.data) if args.data else None)
    cfg.validate("export")
    out = Path(args.out) if args.out else detector_dir.parent / f"export-detector-{args.format}-{cfg.precision}"
    with DirLock(out):
        result = export_whole_detector(detector_dir, out, cfg)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from effvision.export.race import RaceConfig, run_race

    src = Path(args.model_dir)
    model_dir = src if (src / "model.json").is_file() else _newest_model_dir(src)
    out = Path(args.out) if args.out else src / f"deploy-{args.target}"
    cfg = RaceConfig(batch_sizes=args.batch_size, contenders=args.contenders, data=args.data,
                     calib_images=args.calib_images, check_images=args.check_images, rounds=args.rounds,
                     warmup=args.warmup, iters=args.iters, threads=args.threads, remeasure=args.remeasure)
    if args.int8_min_sqnr is not None:
        cfg.thresholds.min_sqnr_db["int8"] = args.int8_min_sqnr
    if args.int8_min_agreement is not None:
        cfg.thresholds.min_agreement["int8"] = args.int8_min_agreement
    report = run_race(model_dir, out, cfg)
    print((out / "race.md").read_text())
    if "int8" in report:
        print("effvision: no INT8 form passed its check; the fp32 winner ships (race.json says why)", file=sys.stderr)
    print(f"wrote {out} (batch-<B>/ per batch size, race.json, race.md, race.png)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import benchmark

    out = Path(args.json) if args.json else None
    if out is not None and out.exists():
        raise EffVisionError(f"{out} exists already; choose another --json path (nothing was overwritten)")
    if out is not None and not out.parent.is_dir():
        raise EffVisionError(f"folder {out.parent} for --json does not exist")
    results = []
    for backend in args.backend:
        r = benchmark(args.target, backend, args.device, args.batch_size, args.img_size, args.warmup, args.iters,
                      args.amp, args.channels_last, args.threads)
        print(f"{backend:8s} {r['device']:5s} batch {args.batch_size:4d}: {r['img_per_s']:10.1f} img/s  "
              f"p50 {r['latency_ms_p50']:.2f} ms  p90 {r['latency_ms_p90']:.2f} ms")
        results.append(r)
    if out is not None:
        out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .models.hub import push_to_hub, stage_for_hub

    src = Path(args.model_dir)
    model_dir = src if (src / "model.json").is_file() else _newest_model_dir(src)
    if args.stage_only:
        print(f"staged {stage_for_hub(model_dir, args.stage_only, args.repo)} (nothing uploaded)")
        return 0
    print(json.dumps(push_to_hub(model_dir, args.repo, args.private), indent=2))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .models.catalog import list_efficient_models, model_cost

    names = list_efficient_models(args.filter)
    if not names:
        raise EffVisionError(f"no efficient model matches '{args.filter}'")
    if args.bench:
        return _bench_models(names, args)
    print(f"{'model':42s} {'params (M)':>10s} {'GMACs':>8s}  input")
    for name in names:
        if args.no_cost:
            print(name)
            continue
        c = model_cost(name)
        print(f"{name:42s} {c.params_m:10.2f} {c.gmacs:8.3f}  {'x'.join(map(str, c.input_size))}")
    return 0


def _bench_models(names: list[str], args: argparse.Namespace) -> int:
    from .runinfo import cpu_name
    from .speed import bench_models, speed_markdown, write_speed_table

    if args.bench == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise EffVisionError("--bench cuda: no CUDA GPU is available")
    backends = tuple(args.backend or (("torch", "ort") if args.bench == "cpu" else ("torch",)))
    if args.bench == "cuda" and any(b.startswith("ort") for b in backends):
        raise EffVisionError("--bench cuda: backend ort runs on the CPU here (onnxruntime-gpu is not installed)")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and any(out.iterdir()):
        raise EffVisionError(f"{out} exists and is not empty; choose another --out (nothing was overwritten)")
    machine = cpu_name() if args.bench == "cpu" else __import__("torch").cuda.get_device_name()
    rows = bench_models(names, args.bench, backends, args.batch_size, args.warmup, args.iters, args.threads)
    print(speed_markdown(rows, backends, machine))
    if out is not None:
        for path in write_speed_table(rows, backends, out, machine).values():
            print(f"wrote {path}")
    return 0


class _Help(argparse.RawDescriptionHelpFormatter):
    """Each option's default shown (unless it is unset or the help names it); examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS, []) and "default" not in text:
            text += " (default: %(default)s)"
        return text


EXAMPLES = {
    "run": """examples:
  effvision run recipes/quickstart.yaml --out runs/quick
  effvision run recipes/quickstart.yaml --set stages.train.epochs=5 --set data.batch_size=64
  effvision run recipes/quickstart.yaml --out runs/quick --resume     # continue an interrupted stage
  torchrun --nproc_per_node 2 -m effvision run recipes/quickstart.yaml # DDP""",
    "check": """A few bf16 training steps of the recipe's model on a CPU slice of its data, at the recipe's
peak learning rate: exit 1 when the loss, gradients or attention logits blow up (run it before a
GPU call is spent on the recipe).
examples:
  effvision check recipes/cifar10_vit_tiny.yaml --set data.root=../shared/datasets/cifar10
  effvision check recipes/quickstart.yaml --steps 40""",
    "eval": """examples:
  effvision eval runs/quick
  effvision eval runs/quick --tta-flip
  effvision eval runs/det/03-export_detection --data ../shared/datasets/coco128     # exported detector, onnxruntime
  effvision eval runs/det/03-export_detection --data ../shared/datasets/coco128 --runtime openvino""",
    "export": """formats: onnx (fp32, parity-checked in onnxruntime; QDQ int8/fp8 for a quantized model),
  tensorrt (ONNX for TensorRT plus an engine when tensorrt imports, else build_engine.sh)
examples:
  effvision export runs/quick                                # newest model -> ONNX, parity-checked
  effvision export runs/quick --format tensorrt --profile 1,8,32
  effvision export runs/quick --target tensorrt --trt-check parser  # TensorRT's own parser (needs tensorrt)
  effvision export runs/quick/03-quantize/model --target ort-cpu
  effvision export runs/quick --format openvino              # + model.xml/.bin, parity vs onnxruntime
  effvision export runs/det --data ../shared/datasets/coco128        # a detector: whole, NMS in the graph
  effvision export runs/det --precision int8 --data ../shared/datasets/coco128 --format tensorrt""",
    "bench": """examples:
  effvision bench deit_tiny_patch16_224 --backend torch ort --batch-size 32
  effvision bench runs/quick --backend ort ort-int8 --json bench.json
  effvision bench model.onnx --backend ort --batch-size 1
  effvision bench runs/det/03-export_detection --backend ort openvino --batch-size 1   # an exported detector
  effvision bench runs/quick --backend ort trt --batch-size 32   # trt: needs tensorrt and a GPU""",
    "deploy": """Exports the model to every CPU runtime and precision installed here (onnxruntime fp32 and
INT8 forms, OpenVINO fp32 and NNCF INT8, torch eager and compile), checks each against the fp32
model (logit SQNR; top-1 agreement on real images), times those that pass round-robin in one
process, and ships the fastest per batch size. A rerun on the same machine reads the recorded
timings (--remeasure measures again).
examples:
  effvision deploy runs/quick --target cpu --batch-size 1 32
  effvision deploy runs/cifar/01-train/model --data ../shared/datasets/cifar10 --out deploy/
  effvision deploy MODEL_DIR --contenders ort-fp32 ort-int8-static openvino-int8-nncf --rounds 7""",
    "push": """examples:
  effvision push runs/quick --repo alice/vit-micro-digits             # needs HF_TOKEN or `hf auth login`
  effvision push runs/quick/01-train/model --repo alice/vit-micro --private
  effvision push runs/quick --repo alice/vit-micro --stage-only hub/   # write the folder, upload nothing""",
    "prune": """examples:
  effvision prune runs/quick/01-train/model --mlp 0.5 --heads 0.25 --out runs/pruned
  effvision prune runs/quick/01-train/model --ratio 0.3 --finetune-epochs 5 --out runs/pruned-ft
  effvision prune MODEL_DIR --data cifar10 --data-root ../shared/datasets/cifar10 --ratio 0.4 --out runs/p""",
    "quantize": """examples:
  effvision quantize runs/quick/01-train/model --target ort-cpu --out runs/int8
  effvision quantize runs/pruned/01-prune/model --target tensorrt --out runs/pruned-int8""",
    "models": """examples:
  effvision models --filter deit
  effvision models --filter "mobilenetv4_*" --bench cpu --out speed/   # measured latency + plot""",
}


def _sub(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=EXAMPLES[name], formatter_class=_Help)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .compress.importance import CRITERIA
    from .compress.prune import PruneSpec
    from .compress.quantize.config import QuantConfig
    from .config import field_choices, field_default

    p = argparse.ArgumentParser(prog="effvision", description="Train, compress, export and benchmark vision models.",
                                epilog="`effvision COMMAND --help` shows each command's options and examples.",
                                formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"effvision {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = _sub(sub, "run", "run a recipe's stages into a run directory")
    r.add_argument("recipe", help="recipe YAML file (see recipes/)")
    r.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. stages.train.epochs=5 or data.batch_size=64")
    r.add_argument("--resume", action="store_true", help="continue an interrupted stage")
    r.set_defaults(fn=_cmd_run)

    k = _sub(sub, "check", "check a recipe's training stability on the CPU before a GPU run")
    k.add_argument("recipe", help="recipe YAML file")
    k.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    k.add_argument("--steps", type=int, default=20, help="training steps")
    k.add_argument("--batch-size", type=int, default=16, help="images per step")
    k.add_argument("--amp", choices=("bf16", "off"), default="bf16", help="autocast as on the GPU (bf16) or off")
    k.set_defaults(fn=_cmd_check)

    e = _sub(sub, "eval", "evaluate a run's newest model on its recipe's eval split")
    e.add_argument("run_dir", help="a run directory made by `effvision run`")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to evaluate")
    e.add_argument("--tta-flip", action="store_true", help="average with the horizontally flipped images")
    e.add_argument("--data", help="detectors: the COCO folder to evaluate on (images/, annotations/instances.json)")
    e.add_argument("--runtime", default="ort", choices=["ort", "openvino"],
                   help="an exported detector: run it in onnxruntime or OpenVINO (its model.xml)")
    e.add_argument("--batch-size", type=int, default=4, help="detectors: images per batch")
    e.add_argument("--limit-images", type=int, help="detectors: only the first N images")
    e.set_defaults(fn=_cmd_eval)

    x = _sub(sub, "export", "export a run's newest model (or a model dir)")
    x.add_argument("run_dir", help="a run directory (its newest model or detector), a model directory or a "
                                   "detector directory (exported whole: image -> boxes, NMS in the graph)")
    x.add_argument("--format", default="onnx", choices=list(EXPORT_FORMATS),
                   help="; ".join(f"{k}: {v}" for k, v in EXPORT_FORMATS.items()))
    x.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "int8"],
                   help="auto: the model's own (int8/fp8 QDQ when quantized, else fp32); int8: a detector's static "
                        "QDQ, calibrated on --data")
    x.add_argument("--target", choices=["tensorrt", "jetpack5", "ort-cpu"],
                   help="runtime the graph is for (default: the quantized model's, else tensorrt)")
    x.add_argument("--profile", default="1,8,32", help="TensorRT batch profile MIN,OPT,MAX")
    x.add_argument("--trt-check", default="auto", choices=["auto", "parser", "offline"],
                   help="TensorRT check: its own ONNX parser (needs tensorrt and a GPU), the offline op list, "
                        "or auto (the parser where it runs)")
    x.add_argument("--ort-optimize", choices=["optimizer", "fused-attention"],
                   help="--target ort-cpu: onnxruntime's transformer optimizer on the graph, optionally with one "
                        "fused Attention op per block (README: measured not faster at batch 32)")
    x.add_argument("--opset", type=int, default=18, help="ONNX opset")
    x.add_argument("--out", help="output folder (default: RUN_DIR/export-<format>-opset<N>)")
    x.add_argument("--static-batch", action="store_true", help="fix the batch axis to 1")
    x.add_argument("--dynamic-hw", action="store_true",
                   help="height and width dynamic too (multiples of 32; CNNs, ViTs built with dynamic_img_size)")
    x.add_argument("--atol", type=float, default=1e-4, help="max abs error allowed vs PyTorch (fp32)")
    x.add_argument("--size", help="detectors: H,W the backbone sees (default: its fixed size, else min_size square)")
    x.add_argument("--score-thresh", type=float, help="detectors: keep scores above this (default: the detector's)")
    x.add_argument("--nms-iou", type=float, help="detectors: NMS IoU threshold in (0, 1) (default: the detector's)")
    x.add_argument("--max-detections", type=int, help="detectors: detections per image, padded (default: 100)")
    x.add_argument("--data", help="detectors: COCO folder for parity images, int8 calibration and the mAP check")
    x.set_defaults(fn=_cmd_export)

    b = _sub(sub, "bench", "inference throughput and latency")
    b.add_argument("target", help="timm model name, model dir, run dir or .onnx file")
    b.add_argument("--backend", nargs="+", default=["torch"],
                   choices=["torch", "compile", "ort", "ort-int8", "openvino", "openvino-int8", "trt"],
                   help="one or more; *-int8 need a quantized model; openvino needs the openvino package; "
                        "trt: a TensorRT engine on the GPU (needs tensorrt; TARGET may be a .engine file)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="ort runs on the cpu")
    b.add_argument("--batch-size", type=int, default=32, help="images per call")
    b.add_argument("--img-size", type=int, help="input size (default: the model's own)")
    b.add_argument("--warmup", type=int, default=10, help="untimed calls first")
    b.add_argument("--iters", type=int, default=50, help="timed calls (median reported)")
    b.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="auto: bf16 on cuda")
    b.add_argument("--channels-last", action="store_true", help="NHWC memory format (CNNs on GPUs)")
    b.add_argument("--threads", type=int, help="CPU threads (default: torch's/onnxruntime's own)")
    b.add_argument("--json", help="write results to this JSON file (must not exist)")
    b.set_defaults(fn=_cmd_bench)

    d = _sub(sub, "deploy", "race every CPU runtime and precision on this machine; ship the fastest per batch size")
    d.add_argument("model_dir", help="a model directory, or a run directory (its newest model)")
    d.add_argument("--target", default="cpu", choices=["cpu"], help="where it will run (this machine's CPU)")
    d.add_argument("--batch-size", type=int, nargs="+", default=[1, 32], help="one winner per batch size")
    d.add_argument("--data", help="images to calibrate and check on: an image folder (train/ and val/ or test/ "
                                  "where present) or a .npy array (N, C, H, W), normalized (default: noise)")
    d.add_argument("--contenders", nargs="+", metavar="NAME",
                   help="only these (default: every one whose runtime is installed; ort-fp32 always runs)")
    d.add_argument("--calib-images", type=int, default=64, help="images for INT8 calibration")
    d.add_argument("--check-images", type=int, default=128, help="held-out images for the checks")
    d.add_argument("--rounds", type=int, default=5, help="round-robin rounds (medians and spread over rounds)")
    d.add_argument("--warmup", type=int, default=3, help="untimed calls per contender per round")
    d.add_argument("--iters", type=int, default=10, help="timed calls per contender per round")
    d.add_argument("--threads", type=int, help="CPU threads for every runtime (default: one per core)")
    d.add_argument("--int8-min-sqnr", type=float,
                   help="an INT8 form passes with logit SQNR vs fp32 at least this (default: 15 dB, race.Thresholds)")
    d.add_argument("--int8-min-agreement", type=float,
                   help="and, on real images (--data), top-1 agreement with fp32 at least this (default: 0.9)")
    d.add_argument("--remeasure", action="store_true", help="time again instead of reading the recorded timings")
    d.add_argument("--out", help="output folder, must not exist (default: MODEL_DIR/deploy-<target>)")
    d.set_defaults(fn=_cmd_deploy)

    for name, fn, text in (("prune", _cmd_prune, "structured pruning of a saved model dir (no recipe needed)"),
                           ("quantize", _cmd_quantize, "INT8/FP8 post-training quantization of a saved model dir, "
                                                      "exported to QDQ ONNX")):
        c = _sub(sub, name, text + "; writes the one-stage recipe it ran into the run dir")
        c.add_argument("model_dir", help="a model directory (a run's <stage>/model, or one saved by effvision.save)")
        c.add_argument("--out", required=True, help="run directory for the result")
        c.add_argument("--data", default="digits", choices=["digits", "cifar10", "imagefolder"],
                       help="data for calibration and evaluation")
        c.add_argument("--data-root", help="folder or .tar.gz of the dataset (cifar10, imagefolder)")
        c.add_argument("--batch-size", type=int, default=64, help="images per batch")
        c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
        c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a value of the generated recipe, e.g. stages.prune.criterion=l1")
        c.add_argument("--resume", action="store_true", help="continue an interrupted run")
        if name == "prune":
            for kind, what in (("ratio", "every kind"), ("heads", "attention heads"), ("mlp", "MLP hidden units"),
                               ("width", "ViT embedding width"), ("channels", "conv/linear channels elsewhere")):
                c.add_argument(f"--{kind}", type=float, help=f"fraction of {what} removed, in (0, 1)")
            c.add_argument("--criterion", default=field_default(PruneSpec, "criterion"), choices=list(CRITERIA),
                           help="importance ranking (taylor and obd use the data)")
            c.add_argument("--finetune-epochs", type=int, default=0,
                           help="then fine-tune this many epochs, distilled from the unpruned model")
        else:
            c.add_argument("--precision", default=field_default(QuantConfig, "precision"),
                           choices=field_choices(QuantConfig, "precision"), help="quantized format")
            c.add_argument("--target", default=field_default(QuantConfig, "target"),
                           choices=field_choices(QuantConfig, "target"),
                           help="runtime the QDQ graph is laid out for (ort-cpu: onnxruntime on CPUs)")
            c.add_argument("--calib-batches", type=int, default=field_default(QuantConfig, "calib_batches"),
                           help="training batches to calibrate on")
        c.set_defaults(fn=fn)

    h = _sub(sub, "push", "upload a model to the Hugging Face Hub (timm's hub layout + model card)")
    h.add_argument("model_dir", help="a model directory, or a run directory (its newest model)")
    h.add_argument("--repo", required=True, help="Hub repository USER/NAME (created if new)")
    h.add_argument("--private", action="store_true", help="create the repository as private")
    h.add_argument("--stage-only", metavar="DIR", help="write the folder that would be uploaded to DIR; no upload")
    h.set_defaults(fn=_cmd_push)

    m = _sub(sub, "models", "list efficient backbones with params and GMACs (and measured latency)")
    m.add_argument("--filter", help="name pattern (fnmatch, or a substring)")
    m.add_argument("--no-cost", action="store_true", help="names only (skip counting)")
    m.add_argument("--bench", choices=["cpu", "cuda"],
                   help="also measure each model's latency on this machine (torch and onnxruntime on the CPU)")
    m.add_argument("--backend", nargs="+", choices=["torch", "compile", "ort", "ort-int8"],
                   help="with --bench: backends to time (default: torch ort on cpu, torch on cuda)")
    m.add_argument("--batch-size", type=int, default=1, help="with --bench (1: latency)")
    m.add_argument("--warmup", type=int, default=5, help="with --bench: untimed calls first")
    m.add_argument("--iters", type=int, default=20, help="with --bench: timed calls (median reported)")
    m.add_argument("--threads", type=int, help="with --bench: CPU threads")
    m.add_argument("--out", help="with --bench: folder for models_speed.{json,md,png}")
    m.set_defaults(fn=_cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except EffVisionError as e:
        if args.debug:
            raise
        print(f"effvision: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _DISK_FULL or args.debug:
            raise
        # Every write is a temporary file renamed into place: what was complete before stays.
        print(f"effvision: error: {e.strerror} while writing {e.filename or 'a file'}; free space, then rerun "
              f"(--resume continues a run from its last checkpoint)", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"effvision: preempted: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    except KeyboardInterrupt:
        print("effvision: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
