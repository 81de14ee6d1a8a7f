"""Modular training on the quickstart data, side by side in one invocation: Deep Model Assembling
(K = 2 and 4) vs the same target end to end, and growth (depth 2 -> 4 blocks, width 48 -> 96)
vs the grown model from scratch, each pair at equal training compute. Test top-1, training time
per stage (evaluation excluded) and, for assembling, the wall-clock if the K incubation jobs ran
on K machines (meta + slowest incubation + finetune). Writes modular_cpu.json, modular_cpu.md and
modular_cpu.png (top-1 against training time) in --out, and files each figure's table in the results
ledger (sections modular-cpu-figures-assemble, modular-cpu-figures-grow) unless --no-ledger.

    .venv/bin/python scripts/modular_cpu_figures.py --out runs/modular_cpu [--only assemble|grow] [--variant K=4]
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from effvision.benchmarks.ledger import add_arguments, record

TRAINING = ("train", "meta", "incubate", "finetune")


def _quickstart(epochs: int, **kwargs: Any) -> dict[str, Any]:
    """recipes/quickstart.yaml's train stage only (no export/bench), ``epochs`` long."""
    recipe = yaml.safe_load(Path("recipes/quickstart.yaml").read_text())
    recipe["stages"] = recipe["stages"][:1]
    recipe["stages"][0].update(epochs=epochs, eval_every=epochs)
    recipe["model"]["kwargs"].update(kwargs)
    return recipe


def _recipe(path: str, **grow: Any) -> dict[str, Any]:
    recipe = yaml.safe_load(Path(path).read_text())
    for stage in recipe["stages"]:
        if stage["type"] == "grow":
            stage.update(grow)
    return recipe


# (label, recipe, training compute as a fraction of the row it is compared with)
FIGURES: dict[str, list[tuple[str, dict[str, Any], float]]] = {
    "assemble": [
        ("end to end, 30 epochs", _quickstart(30), 1.0),
        ("assembled K=2", _recipe("recipes/quickstart_assemble.yaml"), 122 / 120),
        ("assembled K=4", _recipe("recipes/quickstart_assemble_k4.yaml"), 112 / 120),
    ],
    "grow": [
        ("4 blocks from scratch, 20 epochs", _quickstart(20), 1.0),
        ("grown 2 -> 4 blocks", _recipe("recipes/quickstart_grow.yaml"), 1.0),
        ("grown 2 -> 4 blocks, optimizer state carried", _recipe("recipes/quickstart_grow.yaml", optimizer_state="carry"), 1.0),
        ("width 96, 6 heads from scratch, 20 epochs", _quickstart(20, num_heads=6), 1.0),
        ("grown width 48 -> 96", _recipe("recipes/quickstart_grow_width.yaml"), (21 * 0.006563 + 14 * 0.02271) / (20 * 0.02271)),
        ("grown width 48 -> 96, optimizer state carried",
         _recipe("recipes/quickstart_grow_width.yaml", optimizer_state="carry"), (21 * 0.006563 + 14 * 0.02271) / (20 * 0.02271)),
    ],
}


def run_variant(label: str, recipe: dict[str, Any], out: Path) -> dict[str, Any]:
    slug = "".join(c if c.isalnum() else "-" for c in label).strip("-")
    path = out / f"{slug}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = out / slug
    t0 = time.perf_counter()
    code = subprocess.run([sys.executable, "-m", "effvision", "run", str(path), "--out", str(run)]).returncode
    wall = time.perf_counter() - t0
    stages, top1 = [], None
    for i, st in enumerate(recipe["stages"], start=1):
        f = run / f"{i:02d}-{st['type']}" / "summary.json"
        s = json.loads(f.read_text()) if f.is_file() else {}
        stages.append({"type": st["type"], "train_time_s": s.get("train_time_s"), "top1": s.get("top1")})
        top1 = s.get("top1", top1)
    times = [s["train_time_s"] or 0.0 for s in stages if s["type"] in TRAINING]
    inc = [s["train_time_s"] or 0.0 for s in stages if s["type"] == "incubate"]
    return {"variant": label, "exit_code": code, "top1": top1, "stages": stages, "train_s": sum(times),
            "k_machines_s": sum(times) - sum(inc) + max(inc, default=0.0), "run_wall_s": wall,
            "stage_times": [round(t, 1) for t in times]}


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| run | compute | training time per stage (s) | total (s) | on K machines (s) | test top-1 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        top1 = f"{r['top1']:.2f}%" if r["top1"] is not None else f"failed (exit {r['exit_code']})"
        lines.append(f"| {r['variant']} | {r['compute']:.2f} | {' + '.join(f'{t:.1f}' for t in r['stage_times'])} | "
                     f"{r['train_s']:.1f} | {r['k_machines_s']:.1f} | {top1} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/modular_cpu")
    p.add_argument("--only", choices=sorted(FIGURES), help="one figure (default: both)")
    p.add_argument("--variant", action="append", default=[], help="only runs whose label contains this (repeatable)")
    add_arguments(p)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for figure in [args.only] if args.only else sorted(FIGURES):
        for label, recipe, compute in FIGURES[figure]:
            if args.variant and not any(v in label for v in args.variant):
                continue
            row = {"figure": figure, "compute": compute, **run_variant(label, copy.deepcopy(recipe), out)}
            rows.append(row)
            print(f"{label}: top1 {row['top1']}  training {row['train_s']:.1f} s", flush=True)
            (out / "modular_cpu.json").write_text(json.dumps(rows, indent=2))
    (out / "modular_cpu.md").write_text("\n".join(markdown(rows)) + "\n")
    print("\n".join(markdown(rows)))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["top1"] is not None:
            ax.scatter(r["train_s"], r["top1"], label=r["variant"])
    ax.set_xlabel("training time (s), this machine")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("modular training on the quickstart data (equal compute per figure)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "modular_cpu.png", dpi=120)
    if not args.no_ledger:
        command = shlex.join(["python", "scripts/modular_cpu_figures.py", *sys.argv[1:]])
        for figure in sorted({r["figure"] for r in rows}):  # one section per figure: --only runs one of them
            measured = [r for r in rows if r["figure"] == figure]
            table = [{"run": r["variant"], "compute": r["compute"],
                      "training time per stage (s)": " + ".join(f"{t:.1f}" for t in r["stage_times"]),
                      "total (s)": r["train_s"],
                      **({"on K machines (s)": r["k_machines_s"]} if figure == "assemble" else {}),
                      "test top-1 (%)": r["top1"] if r["top1"] is not None else f"failed (exit {r['exit_code']})"}
                     for r in measured]
            path = record(f"modular-cpu-figures-{figure}", table, measured, command, "scripts/modular_cpu_figures.py",
                          args.ledger_dir)
            print(f"ledger: {path}")


if __name__ == "__main__":
    main()
