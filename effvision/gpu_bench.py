"""The runner behind scripts/gpu_bench.sh: every GPU figure from one call, within a time budget.

    python -m effvision.gpu_bench [--budget-s 540] [--sections a,b] [--out DIR] [--check-only] [--toy]

1. An environment check (seconds): torch/timm/triton versions, the GPU, and for every selected
   section its imports, recipes (parsed, model known to timm) and data. Anything missing stops
   the call with one line (exit 2) before the budget is spent.
2. The sections, in ``priority`` order. The budget counts from ``GPU_BENCH_T0`` (set by
   scripts/gpu_bench.sh before unpacking data and wheels) or from the start of this process.
   Each section gets ``share / (sum of the shares still to run)`` of the time left, so time a
   section does not use flows to the later ones; a section whose share is under its ``min_s``
   is skipped (said in the output and its JSON). A section shortens itself to its share
   (``effvision.gpu_sections.seconds_left(args)``); one that overruns its share by
   ``GRACE_S`` is stopped (SIGALRM) and recorded as cut off.
3. After each section: ``OUT/<name>.json`` and ``OUT/ledger.json`` (the whole call so far, in the
   results-ledger format of ``effvision.ledger``) and ``OUT/gpu_bench.md``, so a call cut off by
   the device's time limit still returns everything finished before.

Adding a section (one line in ``SECTIONS``)::

    "token_drop": Section(token_drop_section, token_drop_markdown, priority=35, share=0.10),

where ``token_drop_section(args) -> list[dict]`` returns the rows (plain JSON values) and
``token_drop_markdown(rows) -> list[str]`` the table lines. ``args`` has ``data`` (CIFAR-10
folder or .tar.gz), ``coco``, ``runs`` (folder for run dirs), ``stamp`` (timestamp string),
``toy`` (run at toy size on the CPU: the section's CPU test calls it so), ``budget_s`` (this
section's seconds) and ``deadline`` (``time.time()`` it must end by). ``requires`` (module names)
and ``recipes`` (paths) are checked up front; ``min_s`` is the least time worth starting with.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .assemble.gpu_section import assemble_markdown, assemble_section
from .attention.gpu_section import sparse_attention_markdown, sparse_attention_section
from .tokens.gpu_section import token_drop_markdown, token_drop_section
from .compress.quantize.gpu_section import quantize_markdown, quantize_section
from .dynamic.gpu_section import dynamic_markdown, dynamic_section
from .gpu_sections import (cifar10_markdown, cifar10_section, detection_markdown, detection_section,
                           inference_markdown, inference_section, prune_distill_markdown, prune_distill_section)
from .optim.gpu_section import galore_markdown, galore_section

__all__ = ["Section", "SECTIONS", "main", "check_environment", "plan_order"]

GRACE_S = 20.0  # a section past its share by this much is stopped


@dataclass(frozen=True)
class Section:
    run: Callable[[argparse.Namespace], list[dict[str, Any]]]
    markdown: Callable[[list[dict[str, Any]]], list[str]]
    priority: int                     # lower runs first
    share: float                      # relative weight of the time budget
    title: str = ""
    min_s: float = 10.0               # skipped when its share of the time left is below this
    requires: tuple[str, ...] = ()    # importable modules it needs beyond torch/timm
    recipes: tuple[str, ...] = ()     # recipes it runs: parsed and their models resolved up front
    data: tuple[str, ...] = ()        # "cifar10" and/or "coco": must exist before the call starts


SECTIONS: dict[str, Section] = {
    "cifar10": Section(cifar10_section, cifar10_markdown, priority=10, share=0.45, min_s=150,
                       title="CIFAR-10 reference recipe (recipes/cifar10_vit_tiny.yaml, train stage), "
                             "convvit_tiny_32 throughput",
                       recipes=("recipes/cifar10_vit_tiny.yaml",), data=("cifar10",)),
    "inference": Section(inference_section, inference_markdown, priority=20, share=0.10, min_s=20,
                         title="Inference (bf16, batch 256, 224x224, channels_last, median of 15)"),
    "galore": Section(galore_section, galore_markdown, priority=30, share=0.14, min_s=40,
                      title="GaLore (vit_base_patch16_224, bf16 autocast; rank 128, T 200, scale 0.25)",
                      requires=("triton",), recipes=("recipes/cifar10_vit_galore.yaml",), data=("cifar10",)),
    "quantize": Section(quantize_section, quantize_markdown, priority=40, share=0.08, min_s=30,
                        title="Quantization (deit_tiny, effvision.compress.quantize)",
                        requires=("onnx", "onnxruntime", "onnxscript", "onnxslim")),
    "dynamic": Section(dynamic_section, dynamic_markdown, priority=45, share=0.05, min_s=30,
                       title="Dynamic inference (deit_small_patch16_224 random init, bf16: ToMe r=13 and EViT keep 0.7 "
                             "vs dense at batch 256; contextual sparsity gather path vs dense at batch 1 and 8)"),
    "prune_distill": Section(prune_distill_section, prune_distill_markdown, priority=50, share=0.24, min_s=90,
                             title="Prune + distill, CIFAR-10 (recipes/cifar10_vit_prune_distill.yaml, 50% MACs)",
                             requires=("torch_pruning",), recipes=("recipes/cifar10_vit_prune_distill.yaml",),
                             data=("cifar10",)),
    "detection": Section(detection_section, detection_markdown, priority=60, share=0.10, min_s=60,
                         title="Detection pipeline check (recipes/detection_coco128.yaml, coco128)",
                         requires=("pycocotools",), recipes=("recipes/detection_coco128.yaml",), data=("coco",)),
    "token_drop": Section(token_drop_section, token_drop_markdown, priority=35, share=0.12, min_s=120,
                          title="random-LTD and curriculum on CIFAR-10 (recipes/cifar10_vit_tiny.yaml; effvision.tokens, "
                                "effvision.data.curriculum)",
                          recipes=("recipes/cifar10_vit_tiny.yaml",), data=("cifar10",)),
    "sparse_attention": Section(sparse_attention_section, sparse_attention_markdown, priority=70, share=0.08, min_s=45,
                                title="Block-sparse attention (B 8, H 6, D 64, bf16, block 64; effvision kernel and "
                                      "FlexAttention vs dense SDPA)", requires=("triton",)),
    "assemble": Section(assemble_section, assemble_markdown, priority=80, share=0.10, min_s=90,
                        title="Deep Model Assembling (recipes/cifar10_vit_tiny.yaml's convvit_small_32, K = 2, 3 "
                              "vs end to end, equal compute)",
                        recipes=("recipes/cifar10_vit_tiny.yaml",), data=("cifar10",)),
}


def plan_order(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: SECTIONS[n].priority)


def _has_module(name: str) -> bool:
    if importlib.util.find_spec(name) is not None:
        return True
    # pycocotools may come as a wheel in .data/wheels, unpacked by the detection section itself
    return name == "pycocotools" and any(Path(".data/wheels").glob("pycocotools-*.whl"))


def check_environment(names: list[str], args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """(facts, problems): versions and device, then what each section needs. Imports nothing heavy
    beyond torch/timm; recipes are parsed with the strict recipe parser."""
    import timm
    import torch

    from .recipe import load_recipe

    facts: dict[str, Any] = {"torch": torch.__version__, "timm": timm.__version__,
                             "python": sys.version.split()[0]}
    problems: list[str] = []
    spec = importlib.util.find_spec("triton")
    facts["triton"] = __import__("triton").__version__ if spec is not None else None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts["gpu"] = {"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                        "capability": f"{p.major}.{p.minor}", "driver_cuda": torch.version.cuda}
    elif not args.toy:
        problems.append("no CUDA GPU visible to torch (use --toy for a CPU run at toy size)")
    for name in names:
        sec = SECTIONS[name]
        for mod in sec.requires:
            if args.toy and mod == "triton":
                continue  # the CPU path runs the PyTorch references
            if not _has_module(mod):
                problems.append(f"section {name} needs the Python module '{mod}' (carry its wheel in .data/wheels)")
        for recipe in sec.recipes:
            try:
                r = load_recipe(recipe)
            except Exception as e:  # ConfigError, YAML or file errors: all one line
                problems.append(f"section {name}: recipe {recipe}: {e}")
                continue
            if r.model.name and not timm.is_model(r.model.name):
                problems.append(f"section {name}: recipe {recipe}: unknown model '{r.model.name}'")
        for d in sec.data:
            path = Path(args.data if d == "cifar10" else args.coco)
            if not path.exists():
                problems.append(f"section {name} needs {d} at {path}")
    return facts, problems


class _CutOff(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _CutOff()


def _run_section(name: str, args: argparse.Namespace, budget_s: float) -> dict[str, Any]:
    """One section with its share; the record written to OUT/<name>.json."""
    sec = SECTIONS[name]
    args.budget_s, args.deadline = budget_s, time.time() + budget_s
    t0 = time.perf_counter()
    record: dict[str, Any] = {"status": "ok", "budget_s": round(budget_s, 1), "rows": []}
    use_alarm = hasattr(signal, "setitimer")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, budget_s + GRACE_S)
    try:
        record["rows"] = sec.run(args)
    except _CutOff:
        record["status"] = "cut off"
        print(f"== {name}: cut off after {budget_s + GRACE_S:.0f} s (its share {budget_s:.0f} s)", flush=True)
    except Exception as e:  # one broken section must not hide the others' figures
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
        print(f"== {name} failed: {record['error']}", flush=True)
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    return record


def markdown(records: dict[str, dict[str, Any]], entry: dict[str, Any]) -> str:
    lines = ["# effvision GPU figures\n", f"{entry['machine']}, {entry['date']}; torch "
             f"{entry['environment']['versions'].get('torch')}, timm {entry['environment']['versions'].get('timm')}; "
             f"command: {entry['command']}\n"]
    for name, rec in records.items():
        sec = SECTIONS[name]
        lines.append(f"## {sec.title or name}\n")  # the markdown function gives the table alone
        if rec["status"] == "skipped":
            lines += [f"skipped: {rec['reason']}", ""]
            continue
        if rec["status"] != "ok":
            lines.append(f"{rec['status']}{': ' + rec['error'] if 'error' in rec else ''}\n")
        if rec["rows"]:
            lines += sec.markdown(rec["rows"]) + [""]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=".data/cifar10.tgz", help="CIFAR-10 ImageFolder or its .tar.gz")
    p.add_argument("--out", help="results folder (default results/<timestamp>; an existing non-empty one is refused)")
    p.add_argument("--runs", default="runs/gpu_bench")
    p.add_argument("--coco", default=".data/coco128.tgz", help="coco128 folder or its .tgz (detection section)")
    p.add_argument("--detection-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the detection recipe, e.g. stages.0.epochs=100")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated; run in priority order")
    p.add_argument("--cifar-variant", action="append", default=[],
                   help="extra CIFAR-10 run: space-separated overrides, e.g. 'model.name=convvit_tiny_32'")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="seconds for the whole call, counted from $GPU_BENCH_T0 (set by gpu_bench.sh) if given")
    p.add_argument("--mirror", help="also keep ledger.json and gpu_bench.md current in this folder (e.g. the "
                   "device tool's $OUT, which returns at most 8 files)")
    p.add_argument("--check-only", action="store_true", help="run the environment check and stop")
    p.add_argument("--toy", action="store_true", help="CPU, toy sizes: what the tests run")
    return p


def main(argv: list[str] | None = None) -> int:
    from .ledger import make_entry

    args = _parser().parse_args(argv)
    t0 = float(os.environ.get("GPU_BENCH_T0") or time.time())
    names = [n for n in args.sections.split(",") if n]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"gpu_bench: unknown section '{unknown[0]}' (known: {', '.join(SECTIONS)})", file=sys.stderr)
        return 2
    names = plan_order(names)
    facts, problems = check_environment(names, args)
    print("gpu_bench: " + ", ".join(f"{k} {v}" for k, v in facts.items()), flush=True)
    if problems:
        print(f"gpu_bench: environment check failed: {'; '.join(problems)}", file=sys.stderr)
        return 2
    if args.check_only:
        print(f"gpu_bench: environment ok for {', '.join(names)}")
        return 0
    args.stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"results/{args.stamp}")
    if out.exists() and any(out.iterdir()):
        print(f"gpu_bench: {out} exists and is not empty; choose another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    command = "scripts/gpu_bench.sh " + " ".join(argv if argv is not None else sys.argv[1:])
    entry = make_entry(command.strip(), source="gpu_bench")
    (out / "environment.json").write_text(json.dumps(entry["environment"], indent=2))
    records: dict[str, dict[str, Any]] = {}
    deadline = t0 + args.budget_s
    for i, name in enumerate(names):
        left = deadline - time.time()
        weights = sum(SECTIONS[n].share for n in names[i:])
        share = left * SECTIONS[name].share / weights
        if share < SECTIONS[name].min_s:
            records[name] = {"status": "skipped", "reason": f"{share:.0f} s of {left:.0f} s left would be its share, "
                             f"it needs at least {SECTIONS[name].min_s:.0f} s", "rows": []}
            print(f"== {name}: skipped ({records[name]['reason']})", flush=True)
        else:
            print(f"== {name} (share {share:.0f} s of {left:.0f} s left)", flush=True)
            records[name] = _run_section(name, args, share)
            print(f"== {name} took {records[name]['wall_s']:.0f} s", flush=True)
        (out / f"{name}.json").write_text(json.dumps(records[name], indent=2))
        entry["sections"] = records
        (out / "ledger.json").write_text(json.dumps(entry, indent=1))
        (out / "gpu_bench.md").write_text(markdown(records, entry))
        if args.mirror:
            Path(args.mirror).mkdir(parents=True, exist_ok=True)
            for f in ("ledger.json", "gpu_bench.md"):
                (Path(args.mirror) / f).write_text((out / f).read_text())
    print(markdown(records, entry))
    print(f"gpu_bench: {time.time() - t0:.0f} s of {args.budget_s:.0f} s; results in {out} "
          f"(add to the ledger: python -m effvision.ledger add {out / 'ledger.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
