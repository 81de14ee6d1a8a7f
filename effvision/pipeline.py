"""Run a recipe: its stages in order over one run directory, skipping finished ones.

A stage is finished when its ``summary.json`` exists. A stage directory without one was
interrupted: ``--resume`` continues it (train stages from their last checkpoint; other
stages start over, their partial output moved aside). A run directory made by a different
recipe is never reused, so a rerun cannot overwrite results of another configuration.
One process writes a run directory at a time (``DirLock``, held by rank 0), and a stop signal
ends the run at the next step or stage boundary with a checkpoint (engine/preemption.py).
"""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import apply_overrides, load_yaml
from .dirlock import LOCK_FILE, DirLock
from .engine.distributed import any_rank, barrier, broadcast_object, init_distributed, shutdown
from .engine.preemption import Preempted, stop_on_signals, stop_requested
from .errors import ConfigError, EffVisionError
from .io import atomic_write_json, atomic_write_text
from .recipe import Recipe, parse_recipe, recipe_to_dict
from .runinfo import run_environment
from .engine.stage import resolve_device
from .stages import SUMMARY_FILE, StageContext, preflight, stage_dirs, stage_types

__all__ = ["run_recipe", "RECIPE_FILE", "load_run_recipe"]

RECIPE_FILE = "recipe.yaml"


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{where}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{where or 'recipe'}: {a!r} vs {b!r}"


def load_run_recipe(run_dir: str | Path) -> Recipe:
    """The resolved recipe a run directory was made with."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise EffVisionError(f"{run_dir} is not an effvision run directory (no {RECIPE_FILE})")
    return parse_recipe(load_yaml(path))


def run_recipe(recipe_path: str | Path, out: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
               resume: bool = False) -> Path:
    raw = apply_overrides(load_yaml(recipe_path), overrides)
    recipe = parse_recipe(copy.deepcopy(raw))
    resolved = recipe_to_dict(recipe)
    run_dir = Path(out) if out else Path("runs") / recipe.name
    preflight(recipe)

    device = resolve_device(recipe.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_distributed(device)
    lock = DirLock(run_dir)
    try:
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        if recipe.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        # Rank 0 alone locks, reads and changes the run directory; the others follow its decisions.
        _on_main(dist, lambda: _prepare_run_dir(run_dir, resolved, lock))
        with stop_on_signals():
            _run_stages(recipe, run_dir, resume, device, dist)
    finally:
        if dist.is_main:
            lock.release()
        shutdown()
    return run_dir


def _run_stages(recipe: Recipe, run_dir: Path, resume: bool, device: torch.device, dist: Any) -> None:
    stages = stage_types()
    for index, cfg in enumerate(recipe.stages, start=1):
        stage_cls = stages[cfg.type]
        stage_dir = run_dir / f"{index:02d}-{cfg.type}"
        if any_rank(stop_requested() is not None, device):  # between stages: nothing to checkpoint
            raise Preempted(f"stopped by {stop_requested() or 'a stop signal on another rank'} before stage "
                            f"{stage_dir.name}; rerun with --resume to continue")
        action = _on_main(dist, lambda: _prepare_stage_dir(stage_dir, run_dir, stage_cls.resumable, resume))
        if action == "skip":
            continue
        torch.manual_seed(recipe.seed)
        ctx = StageContext(recipe, run_dir, stage_dir, index, device, dist, resume=action == "resume")
        t0 = time.perf_counter()
        summary: dict[str, Any] = {}
        if stage_cls.distributed or dist.is_main:
            summary = stage_cls(cfg, ctx).run()
        barrier()
        if dist.is_main:
            summary = {"stage": cfg.type, **summary, "stage_time_s": time.perf_counter() - t0}
            atomic_write_json(stage_dir / SUMMARY_FILE, summary)
            _print_summary(stage_dir.name, summary)


def _on_main(dist, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and give its result, or its user error, to every rank."""
    result: tuple[str, Any] = ("ok", None)
    if dist.is_main:
        try:
            result = ("ok", fn())
        except EffVisionError as e:
            result = ("error", str(e))
    result = broadcast_object(result)
    if result[0] == "error":
        raise EffVisionError(result[1])
    return result[1]


def _prepare_run_dir(run_dir: Path, resolved: dict[str, Any], lock: DirLock) -> None:
    recipe_file = run_dir / RECIPE_FILE
    if not recipe_file.is_file() and run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise EffVisionError(f"{run_dir} exists and is not an effvision run directory; choose another --out")
    lock.acquire()  # before anything is read for a decision: a second writer stops here
    started = any(any(d.iterdir()) for d in stage_dirs(run_dir))
    if recipe_file.is_file() and not started:
        # A run that failed before any stage produced output holds nothing to protect:
        # the corrected recipe takes its place.
        atomic_write_text(recipe_file, yaml.safe_dump(resolved, sort_keys=False))
    elif recipe_file.is_file():
        stored = load_yaml(recipe_file)
        try:  # re-resolved by today's parser: options added since the run started take their defaults
            stored = recipe_to_dict(parse_recipe(copy.deepcopy(stored)))
        except (ConfigError, EffVisionError):
            pass  # compared as stored; the first difference names what changed
        diff = _first_difference(stored, resolved)
        if diff:
            raise ConfigError(f"{run_dir} holds a run of a different recipe (differs at {diff}); "
                              f"choose another --out (nothing was overwritten)")
    else:
        atomic_write_text(recipe_file, yaml.safe_dump(resolved, sort_keys=False))
        atomic_write_json(run_dir / "environment.json", run_environment())


def _prepare_stage_dir(stage_dir: Path, run_dir: Path, resumable: bool, resume: bool) -> str:
    """'skip' (finished), 'run' (fresh) or 'resume' (continue an interrupted stage)."""
    if (stage_dir / SUMMARY_FILE).is_file():
        print(f"[{stage_dir.name}] finished earlier, skipping")
        return "skip"
    interrupted = stage_dir.is_dir() and any(stage_dir.iterdir())
    if interrupted and not resume:
        raise EffVisionError(f"stage {stage_dir.name} in {run_dir} was interrupted; rerun with --resume to continue it")
    if interrupted and not resumable:
        # Start over, keeping the partial output beside it (nothing on disk is lost).
        stage_dir.rename(stage_dir.with_name(f"{stage_dir.name}.incomplete-{int(time.time())}"))
    stage_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{stage_dir.name}] {'resuming' if interrupted and resumable else 'running'}")
    return "resume" if interrupted and resumable else "run"


def _print_summary(name: str, summary: dict[str, Any]) -> None:
    keys = ("top1", "top5", "train_time_s", "train_img_per_s", "params_m", "gmacs", "onnx", "loss_first", "loss_last",
            "bbox_mAP", "bbox_mAP50")
    parts = [f"{k}={summary[k]:.4g}" if isinstance(summary[k], float) else f"{k}={summary[k]}"
             for k in keys if k in summary]
    if "parity" in summary:
        parts.append(f"parity_max_abs_err={summary['parity']['max_abs_error']:.2e}")
    print(f"[{name}] done: {' '.join(parts)}")
