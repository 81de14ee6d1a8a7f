"""The CPU runtime race (`effvision deploy --target cpu`) on several models, run --runs times
each (every run measures again), aggregated: per model and batch size, each contender's img/s
relative to onnxruntime fp32 (median over runs, min-max spread) and the winner of every run.
Models are timm's, random init (no weights download here): the checks are logit SQNR on
Gaussian noise unless --data is given. Writes OUT/cpu_race.json and OUT/cpu_race.png, and files
the table in the results ledger (section cpu-race) unless --no-ledger.

    .venv/bin/python scripts/cpu_race_figures.py [--models deit_tiny_patch16_224 deit_small_patch16_224 resnet18]
        [--runs 3] [--rounds 3] [--out runs/cpu_race]
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import timm
import torch

import effvision as ev
import effvision.models  # noqa: F401
from effvision.benchmarks.ledger import add_arguments, record
from effvision.export.race import BASELINE, REGISTRY, RaceConfig, run_race


def _model_dir(name: str, out: Path) -> Path:
    folder = out / name / "model"
    if not (folder / "model.json").is_file():
        torch.manual_seed(0)
        ev.save(timm.create_model(name), folder)
    return folder


def _races(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """--runs races of ``name``; a run whose folder exists is read, not raced again."""
    model_dir, reports = _model_dir(name, args.out), []
    for i in range(args.runs):
        folder = args.out / name / f"run-{i + 1}"
        if not (folder / "race.json").is_file():
            run_race(model_dir, folder, RaceConfig(batch_sizes=args.batch_sizes, data=args.data, rounds=args.rounds,
                                                   warmup=args.warmup, iters=args.iters, threads=args.threads,
                                                   calib_images=args.calib_images, check_images=args.check_images,
                                                   remeasure=True))
        reports.append(json.loads((folder / "race.json").read_text()))
    return reports


def _aggregate(name: str, reports: list[dict[str, Any]], batch: str) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "batch": int(batch)}
    base = [r["contenders"][BASELINE]["timings"][batch]["img_per_s"] for r in reports]
    row["ort fp32 img/s (runs)"] = " / ".join(f"{v:,.1f}" for v in base)
    for contender in (c for c in REGISTRY if c != BASELINE):
        ratios = [r["contenders"][contender]["timings"][batch]["vs_ort_fp32"] for r in reports
                  if "timings" in r["contenders"].get(contender, {})]
        if len(ratios) < len(reports):
            states = {r["contenders"].get(contender, {}).get("status", "absent") for r in reports}
            row[contender] = "not timed (" + ", ".join(sorted(states)) + ")"
            continue
        row[contender] = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
    row["winner per run"] = ", ".join(r["winners"][batch] for r in reports)
    return row


def _plot(rows: list[dict[str, Any]], raw: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 4), sharey=True, squeeze=False)
    for ax, row in zip(axes[0], rows):
        reports = raw[row["model"]]
        names, med, lo, hi = [], [], [], []
        for contender in REGISTRY:
            ratios = [r["contenders"][contender]["timings"][str(row["batch"])]["vs_ort_fp32"] for r in reports
                      if "timings" in r["contenders"].get(contender, {})]
            if len(ratios) == len(reports):
                names.append(contender)
                m = statistics.median(ratios)
                med.append(m), lo.append(m - min(ratios)), hi.append(max(ratios) - m)
        int8 = [reports[0]["contenders"][n]["precision"] == "int8" for n in names]
        ax.barh(names, med, xerr=[lo, hi], capsize=2, color=["C0" if q else "C1" for q in int8])
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{row['model'].split('_patch')[0]}, batch {row['batch']}", fontsize=9)
        ax.set_xlabel("img/s vs onnxruntime fp32")
    fig.suptitle(f"CPU runtime race, {len(next(iter(raw.values())))} runs each (median, min-max); blue: INT8",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "deit_small_patch16_224", "resnet18"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--check-images", type=int, default=128)
    p.add_argument("--data", help="image folder or .npy to calibrate and check on (default: noise)")
    p.add_argument("--out", type=Path, default=Path("runs/cpu_race"))
    p.add_argument("--plot", type=Path, help="also copy the plot here (e.g. docs/cpu_race.png)")
    add_arguments(p)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    raw = {name: _races(name, args) for name in args.models}
    rows = [_aggregate(name, raw[name], str(b)) for name in args.models for b in args.batch_sizes]
    (args.out / "cpu_race.json").write_text(json.dumps({"rows": rows, "races": raw}, indent=1) + "\n")
    _plot(rows, raw, args.out / "cpu_race.png")
    if args.plot:
        _plot(rows, raw, args.plot)
    for row in rows:
        print(json.dumps(row))
    if not args.no_ledger:
        trimmed = {name: [{"winners": r["winners"], "machine": r["machine"], "settings": r["settings"],
                           "contenders": {n: {k: e.get(k) for k in ("status", "reason", "checks", "timings")}
                                          for n, e in r["contenders"].items()}} for r in reports]
                   for name, reports in raw.items()}
        command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        print(f"ledger: {record('cpu-race', rows, trimmed, command, 'scripts/cpu_race_figures.py', args.ledger_dir)}")


if __name__ == "__main__":
    main()
