"""``effvision deploy MODEL_DIR --target cpu``: export a float model to every CPU runtime and
precision installed here, check each against the fp32 PyTorch model, time the ones that pass
round-robin in one process, and ship the fastest per batch size.

Output (a new folder; everything is built in a temporary one beside it and moved into place
only when complete, so nothing on disk is overwritten):
- ``batch-<B>/``: the winner's files for batch B with its manifest.json (runtime, precision,
  input and preprocessing, its checks and timings);
- ``race.json``: the machine, the settings and every contender's record (built or why not, its
  checks, img/s per batch per round); ``race.md`` the table; ``race.png`` the plot.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from effvision.errors import EffVisionError
from effvision.models.io import load_model, read_spec

from ..hooks import quantization_of
from ..manifest import classifier_io, package_versions, sha256, write_manifest
from .checks import RaceImages, Thresholds, check, race_images
from .contenders import REGISTRY, BuildContext, Registration, Unavailable, missing_package
from .report import race_markdown, race_plot
from .timings import RecordedTimings, round_robin, summarize

__all__ = ["RaceConfig", "run_race", "BASELINE"]

BASELINE = "ort-fp32"  # every ratio is to onnxruntime fp32 on effvision's export; always raced


@dataclass
class RaceConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    contenders: list[str] | None = None     # None: every registered one whose runtime is installed
    data: str | None = None                 # image folder or .npy (N, C, H, W); None: Gaussian noise
    calib_images: int = 64
    check_images: int = 128
    rounds: int = 5
    warmup: int = 3
    iters: int = 10
    threads: int | None = None              # None: one per core
    remeasure: bool = False                 # ignore the recorded timings
    thresholds: Thresholds = field(default_factory=Thresholds)


def _chosen(cfg: RaceConfig) -> tuple[list[Registration], dict[str, str]]:
    """The registrations to build, in build order, and those skipped with why."""
    asked = cfg.contenders
    if asked is not None:
        unknown = [n for n in asked if n not in REGISTRY]
        if unknown:
            raise EffVisionError(f"unknown contender {', '.join(unknown)} (available: {', '.join(REGISTRY)})")
        for name in asked:  # asked for by name: a missing runtime is the user's error
            pkg = missing_package(REGISTRY[name])
            if pkg is not None:
                raise Unavailable(f"contender {name} needs {pkg}, which is not installed: "
                                  f"pip install 'effvision[{REGISTRY[name].extra}]'")
    names = set(asked or REGISTRY) | {BASELINE}
    skipped: dict[str, str] = {}
    for reg in REGISTRY.values():  # registration order puts every input before its users
        pkg = missing_package(reg)
        if reg.name in names and pkg is not None:
            skipped[reg.name] = f"{pkg} is not installed (pip install 'effvision[{reg.extra}]')"
    chosen = [r for r in REGISTRY.values() if r.name in names and r.name not in skipped]
    need = {d for r in chosen for d in r.needs}
    while need - {r.name for r in chosen}:  # inputs of a chosen one are built (and raced) too
        chosen = [r for r in REGISTRY.values() if r.name in need | {c.name for c in chosen}]
        need = {d for r in chosen for d in r.needs}
    return chosen, skipped


def preflight(model_dir: Path, out: Path, cfg: RaceConfig) -> tuple[list[Registration], dict[str, str]]:
    """Every check that needs no work; each raises before anything is written."""
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise EffVisionError(f"batch sizes must be at least 1, got {cfg.batch_sizes}")
    if cfg.rounds < 1 or cfg.iters < 1 or cfg.warmup < 0 or cfg.check_images < 1:
        raise EffVisionError("rounds, iters and check images must be at least 1, warmup at least 0")
    if out.exists():
        raise EffVisionError(f"{out} exists already; choose another --out (nothing was overwritten)")
    if not out.parent.is_dir():
        raise EffVisionError(f"folder {out.parent} for --out does not exist")
    spec = read_spec(model_dir)
    if quantization_of(spec) is not None:
        raise EffVisionError(f"{model_dir} is already quantized; race the float model (the race makes every INT8 "
                             f"form itself)")
    return _chosen(cfg)


def _logits(run: Any, x: np.ndarray, chunk: int) -> np.ndarray:
    """``run`` over ``x`` in full chunks (the last one padded: compiled graphs keep one shape)."""
    outs = []
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk]
        pad = chunk - len(part)
        if pad:
            part = np.concatenate([part, np.repeat(part[-1:], pad, 0)])
        outs.append(np.asarray(run(np.ascontiguousarray(part)), np.float32)[:chunk - pad])
    return np.concatenate(outs)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _model_digest(model_dir: Path) -> str:
    return "-".join(sha256(p)[:16] for p in sorted(model_dir.iterdir()) if p.is_file())


def _timing_key(model_dir: Path, images: RaceImages, names: list[str], cfg: RaceConfig, threads: int
                ) -> dict[str, Any]:
    from effvision.runinfo import cpu_name

    data = hashlib.sha256(images.calibration.tobytes() + images.check.tobytes()).hexdigest()[:16]
    versions = package_versions()
    try:
        import nncf

        versions["nncf"] = nncf.__version__
    except ImportError:
        pass
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "versions": versions,
            "model": _model_digest(model_dir), "data": data, "contenders": names, "batch_sizes": cfg.batch_sizes,
            "rounds": cfg.rounds, "warmup": cfg.warmup, "iters": cfg.iters}


def _winner_folder(dst: Path, entry: dict[str, Any], contender: Any, spec: Any, shape: tuple[int, int, int],
                   batch: int) -> None:
    dst.mkdir()
    for name in contender.files:
        shutil.copy2(contender.folder / name, dst / name)
    write_manifest(dst, contender.files, {
        "race_winner": {"batch_size": batch, "contender": contender.name, "runtime": contender.runtime,
                        "precision": contender.precision, **entry["timings"][str(batch)]},
        "format": contender.runtime, "model": spec.name, **classifier_io(spec, shape, True),
        "how": contender.record, "checks": entry["checks"]})


def run_race(model_dir: str | Path, out: str | Path, cfg: RaceConfig) -> dict[str, Any]:
    model_dir, out = Path(model_dir), Path(out)
    chosen, skipped = preflight(model_dir, out, cfg)
    threads = cfg.threads or os.cpu_count() or 1
    model, spec = load_model(model_dir)
    model.eval()
    shape = (spec.in_chans, spec.img_size, spec.img_size)
    images = race_images(cfg.data, shape, tuple(spec.mean), tuple(spec.std), cfg.calib_images, cfg.check_images)
    torch.set_num_threads(threads)
    chunk = max(cfg.batch_sizes)
    with torch.inference_mode():
        ref = _logits(lambda x: model(torch.from_numpy(x)).float().numpy(), images.check, chunk)
    entries: dict[str, dict[str, Any]] = {n: {"status": "skipped", "reason": r} for n, r in skipped.items()}
    runners: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp_name:
        tmp = Path(tmp_name)
        ctx = BuildContext(model, model_dir, shape, images.calibration, threads,
                           transformer=hasattr(model, "blocks") and hasattr(model, "patch_embed"),
                           batch_sizes=sorted(set(cfg.batch_sizes)))
        for reg in chosen:
            entry: dict[str, Any] = {"runtime": reg.runtime, "precision": reg.precision,
                                     "description": reg.description}
            entries[reg.name] = entry
            lost = [d for d in reg.needs if d not in ctx.built]
            if lost:
                entry.update(status="skipped", reason=f"needs {', '.join(lost)}, which did not build")
                continue
            folder = tmp / "contenders" / reg.name
            folder.mkdir(parents=True)
            try:
                contender = reg.build(ctx, folder)
                ctx.built[reg.name] = contender
                entry["how"] = contender.record
                run = contender.make_runner(threads)
                entry["checks"] = check(ref, _logits(run, images.check, chunk), reg.precision, images,
                                        cfg.thresholds)
            except Exception as e:  # one contender that breaks (a runtime's own error types) is a result
                entry.update(status="failed", reason=f"{type(e).__name__}: {_first_line(e)}")
                continue
            entry["status"] = "passed" if entry["checks"]["passed"] else "failed check"
            if not entry["checks"]["passed"]:
                entry["reason"] = entry["checks"]["reason"]
                continue
            runners[reg.name] = run
        if BASELINE not in runners:
            raise EffVisionError(f"the fp32 onnxruntime baseline did not pass: {entries[BASELINE].get('reason')}")
        recorded = RecordedTimings(_timing_key(model_dir, images, list(runners), cfg, threads))
        times = None if cfg.remeasure else recorded.read()
        reused = times is not None
        if times is None:
            times = round_robin(runners, shape, cfg.batch_sizes, cfg.rounds, cfg.warmup, cfg.iters)
            recorded.write(times)
        winners: dict[str, str] = {}
        for b in cfg.batch_sizes:
            base = summarize(times[BASELINE][str(b)], b)["img_per_s"]
            for name in runners:
                t = summarize(times[name][str(b)], b)
                entries[name].setdefault("timings", {})[str(b)] = {**t, "vs_ort_fp32": t["img_per_s"] / base}
            winners[str(b)] = max(runners, key=lambda n: entries[n]["timings"][str(b)]["img_per_s"])
        result_dir = tmp / "result"
        result_dir.mkdir()
        for b, name in winners.items():
            _winner_folder(result_dir / f"batch-{b}", entries[name], ctx.built[name], spec, shape, int(b))
        int8_tried = [n for n, e in entries.items() if e.get("precision") == "int8" and e["status"] != "skipped"]
        report = {
            "model": spec.name, "source": str(model_dir), "input": [*shape], "threads": threads,
            "machine": _machine(threads), "settings": {k: v for k, v in cfg.__dict__.items() if k != "thresholds"},
            "thresholds": cfg.thresholds.__dict__, "images": images.source, "baseline": BASELINE,
            "timings": {"reused": reused, "record": str(recorded.path),
                        "method": "round-robin in one process: each round times every contender in turn at each "
                                  "batch size (warmup, then the median of iters calls); figures are medians over "
                                  "rounds, spread = slowest and fastest round"},
            "winners": winners, "contenders": entries,
        }
        if int8_tried and not any(entries[n]["status"] == "passed" for n in int8_tried):
            report["int8"] = {"shipped": False, "why": {n: entries[n].get("reason") for n in int8_tried}}
        (result_dir / "race.json").write_text(json.dumps(report, indent=2) + "\n")
        (result_dir / "race.md").write_text(race_markdown(report))
        report["plot"] = race_plot(report, result_dir / "race.png")
        try:  # one rename: a reader sees the whole folder or none; a second race into out fails here
            os.rename(result_dir, out)
        except OSError as e:
            raise EffVisionError(f"{out} appeared while the race ran; its results were not moved there "
                                 f"(nothing was overwritten)") from e
    return report


def _machine(threads: int) -> dict[str, Any]:
    from effvision.runinfo import run_environment

    env = run_environment()
    return {**env.get("hardware", {}), "threads_used": threads, "versions": env.get("versions", package_versions())}
