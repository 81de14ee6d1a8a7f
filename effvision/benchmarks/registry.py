"""The gpu_bench section registry and what a section may use: the time it has left, the device,
toy-size recipes, ``effvision run`` in a subprocess.

A section is ``def <name>_section(args) -> list[dict]`` (the rows, plain JSON values) plus
``def <name>_markdown(rows) -> list[str]`` (the table lines), registered once by the package it
measures (its ``plugin.py``)::

    register_section("token_drop", Section("effvision.tokens.gpu_section:token_drop_section",
                                           "effvision.tokens.gpu_section:token_drop_markdown",
                                           priority=35, share=0.10, title="..."))

Functions are named ``"module:function"`` and imported only when the runner needs them, so
registering costs nothing. ``args`` carries ``data`` (CIFAR-10 folder or .tar.gz), ``coco``,
``runs`` (folder for run dirs), ``stamp``, ``toy`` (CPU, toy sizes: what the tests run),
``budget_s`` (this section's share of the call, seconds) and ``deadline`` (time.time() by which
it must be done; ``seconds_left(args)``). ``requires`` (module names) and ``recipes`` (paths)
are checked up front; ``min_s`` is the least time worth starting with. This module imports no
technique: it sits below them, and the runner (``benchmarks.runner``) above.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Section", "register_section", "sections", "seconds_left", "device_of", "derive_recipe", "run_recipe",
           "summaries", "fmt"]

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Section:
    run_ref: str | Callable[[argparse.Namespace], Rows]   # "module:function" (or the function): (args) -> rows
    markdown_ref: str | Callable[[Rows], list[str]]       # "module:function" (or the function): rows -> lines
    priority: int                     # lower runs first
    share: float                      # relative weight of the time budget
    title: str = ""
    min_s: float = 10.0               # skipped when its share of the time left is below this
    requires: tuple[str, ...] = ()    # importable modules it needs beyond torch/timm
    recipes: tuple[str, ...] = ()     # recipes it runs: parsed and their models resolved up front
    data: tuple[str, ...] = ()        # "cifar10" and/or "coco": must exist before the call starts

    def run(self, args: argparse.Namespace) -> Rows:
        return _resolve(self.run_ref)(args)

    def markdown(self, rows: Rows) -> list[str]:
        return _resolve(self.markdown_ref)(rows)


def _resolve(ref: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


_SECTIONS: dict[str, Section] = {}


def register_section(name: str, section: Section) -> Section:
    _SECTIONS[name] = section
    return section


def sections() -> dict[str, Section]:
    """Every registered section (the techniques' and the core ones below)."""
    from .. import plugins

    plugins.load_plugins()
    return dict(_SECTIONS)


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


def summaries(run_dir: Path) -> dict[str, dict[str, Any]]:
    """stage type -> summary.json of each finished stage."""
    out = {}
    for p in sorted(run_dir.glob("*/summary.json")):
        s = json.loads(p.read_text())
        out[s.get("stage", p.parent.name.split("-", 1)[-1])] = s
    return out


def fmt(v: Any, spec: str = "", none: str = "") -> str:
    return none if v is None else format(v, spec)


_CORE = "effvision.benchmarks.core_sections"
register_section("cifar10", Section(f"{_CORE}:cifar10_section", f"{_CORE}:cifar10_markdown", priority=10, share=0.45,
                                    min_s=150, title="CIFAR-10 reference recipe (recipes/cifar10_vit_tiny.yaml, train "
                                                     "stage), convvit_tiny_32 throughput",
                                    recipes=("recipes/cifar10_vit_tiny.yaml",), data=("cifar10",)))
register_section("inference", Section(f"{_CORE}:inference_section", f"{_CORE}:inference_markdown", priority=20,
                                      share=0.10, min_s=20,
                                      title="Inference (bf16, batch 256, 224x224, channels_last, median of 15)"))
