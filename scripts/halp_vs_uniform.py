"""Per-layer (HALP knapsack) vs uniform pruning at the same latency budget, on a trained model.

    .venv/bin/python scripts/halp_vs_uniform.py runs/quickstart --budgets 0.55,0.4 --epochs 5 \
        --out runs/halp_vs_uniform [--only halp-0.55]

For every budget and allocation it runs ``effvision run`` on a recipe made from the dense run's
(model.init_from its 01-train model): prune (taylor, onnxruntime latency budget, heads and MLP)
-> eval (top-1 before fine-tuning) -> finetune (distilled from the dense model) -> eval. Variants
already done in --out are kept (so the work can be split into short runs). Then every pruned model
and the dense one are timed in onnxruntime in one process, round-robin (medians), and the table
(halp_vs_uniform.md/json) and plot (halp_vs_uniform.png: top-1 against measured latency) are written
to --out, and filed in the results ledger (section halp-vs-uniform, every cycle's seconds) unless
--no-ledger.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from effvision.benchmarks.ledger import add_arguments, record
from effvision.compress.budget import BudgetSpec, _runner
from effvision.compress.halp import round_robin_times
from effvision.models.io import load_model


def recipe_for(run: Path, budget: float, allocation: str, epochs: int, calib: int) -> dict[str, Any]:
    dense = (run / "01-train" / "model").resolve()
    base = yaml.safe_load((run / "recipe.yaml").read_text())
    base["model"]["init_from"] = str(dense)
    base["name"] = f"{allocation}-{budget}"
    base["stages"] = [
        {"type": "prune", "criterion": "taylor", "calib_batches": calib, "round_to": 8,
         "budget": {"metric": "latency", "backend": "ort", "fraction": budget, "allocation": allocation},
         "budget_kinds": ["heads", "mlp"]},
        {"type": "eval"},
        {"type": "finetune", "epochs": epochs, "optimizer": {"name": "adamw", "lr": 1.0e-3, "weight_decay": 0.05},
         "scheduler": {"name": "cosine", "warmup_epochs": 1}, "label_smoothing": 0.0, "eval_every": 0,
         "distill": {"teacher": str(dense), "kind": "soft", "alpha": 1.0, "temperature": 2.0}},
        {"type": "eval"},
    ]
    return base


def run_variant(run: Path, out: Path, budget: float, allocation: str, epochs: int, calib: int) -> Path:
    vdir = out / f"{allocation}-{budget}"
    if (vdir / "04-eval" / "summary.json").is_file():
        print(f"{vdir.name}: done already", flush=True)
        return vdir
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / f"{allocation}-{budget}.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(run, budget, allocation, epochs, calib), sort_keys=False))
    print(f"== {vdir.name}", flush=True)
    shutil.rmtree(vdir, ignore_errors=True)  # an unfinished variant of ours: start it again
    r = subprocess.run([sys.executable, "-m", "effvision", "run", str(recipe), "--out", str(vdir)])
    if r.returncode != 0:
        raise SystemExit(f"{vdir.name}: effvision run failed ({r.returncode})")
    return vdir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a dense run (01-train/model, recipe.yaml), e.g. runs/quickstart")
    p.add_argument("--budgets", default="0.55,0.4")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--out", default="runs/halp_vs_uniform")
    p.add_argument("--only", default="", help="comma list of variants to run now, e.g. halp-0.55 (default: all)")
    p.add_argument("--cycles", type=int, default=60, help="round-robin cycles of the final timing")
    p.add_argument("--skip-timing", action="store_true")
    add_arguments(p)
    args = p.parse_args()
    run, out = Path(args.run_dir), Path(args.out)
    variants = [(float(b), a) for b in args.budgets.split(",") for a in ("uniform", "halp")]
    only = set(filter(None, args.only.split(",")))
    for budget, allocation in variants:
        if not only or f"{allocation}-{budget}" in only:
            run_variant(run, out, budget, allocation, args.epochs, args.calib_batches)
    if args.skip_timing:
        return
    done = [(b, a) for b, a in variants if (out / f"{a}-{b}" / "04-eval" / "summary.json").is_file()]
    dense, spec = load_model(run / "01-train" / "model")
    shape = (32, spec.in_chans, spec.img_size, spec.img_size)
    timing = BudgetSpec(metric="latency", backend="ort", batch_size=32)
    with ExitStack() as stack:
        runners = {"dense": _runner(dense, shape, timing, stack)}
        for b, a in done:
            runners[f"{a}-{b}"] = _runner(load_model(out / f"{a}-{b}" / "03-finetune" / "model")[0], shape, timing, stack)
        print(f"timing {len(runners)} models round-robin in onnxruntime, {args.cycles} cycles", flush=True)
        cycles = round_robin_times(runners, args.cycles)  # every cycle's seconds: the ledger's raw numbers
    seconds = {k: statistics.median(v) for k, v in cycles.items()}
    rows = []
    for b, a in done:
        vdir = out / f"{a}-{b}"
        prune = json.loads((vdir / "01-prune" / "prune.json").read_text())
        before = json.loads((vdir / "02-eval" / "summary.json").read_text())["top1"]
        after = json.loads((vdir / "04-eval" / "summary.json").read_text())["top1"]
        rows.append({"budget": b, "allocation": a, "latency_vs_dense": seconds[f"{a}-{b}"] / seconds["dense"],
                     "img_s": shape[0] / seconds[f"{a}-{b}"], "stage_latency_fraction": prune.get("latency_fraction"),
                     "macs_fraction": prune["macs_fraction"], "params_fraction": prune["params_fraction"],
                     "top1_before_ft": before, "top1_after_ft": after, "widths": prune["widths"],
                     "table_reused": prune.get("latency_table_reused")})
    dense_top1 = json.loads((run / "02-eval" / "summary.json").read_text())["top1"] \
        if (run / "02-eval" / "summary.json").is_file() else None
    (out / "halp_vs_uniform.json").write_text(json.dumps({"dense_top1": dense_top1, "dense_img_s": shape[0] / seconds["dense"],
                                                          "rows": rows}, indent=2))
    lines = [f"dense: top-1 {dense_top1}, {shape[0] / seconds['dense']:.0f} img/s (onnxruntime fp32, batch 32)", "",
             "| budget | allocation | latency vs dense (round-robin) | in-stage | MACs | top-1 no FT | top-1 after FT | heads | MLP units |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        heads = [w for n, w in r["widths"].items() if n.endswith("attn")]
        units = [w for n, w in r["widths"].items() if n.endswith("fc1")]
        lines.append(f"| {r['budget']} | {r['allocation']} | {r['latency_vs_dense']:.3f} | {r['stage_latency_fraction']:.3f} | "
                     f"{r['macs_fraction']:.0%} | {r['top1_before_ft']:.2f}% | {r['top1_after_ft']:.2f}% | {heads} | {units} |")
    (out / "halp_vs_uniform.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    _plot(rows, dense_top1, out / "halp_vs_uniform.png")
    if not args.no_ledger:
        raw = {"seconds_per_cycle": cycles, "batch_size": shape[0], "dense_top1": dense_top1, "rows": rows}
        command = shlex.join(["python", "scripts/halp_vs_uniform.py", *sys.argv[1:]])
        path = record("halp-vs-uniform", _ledger_rows(rows, cycles, dense_top1), raw, command,
                      "scripts/halp_vs_uniform.py", args.ledger_dir)
        print(f"ledger: {path}")


def _ledger_rows(rows: list[dict[str, Any]], cycles: dict[str, list[float]],
                 dense_top1: float | None) -> list[dict[str, Any]]:
    """The ledger table: the dense model first, then every variant, with the spread of its cycles."""
    dense = {"budget": None, "allocation": "dense", "stage_latency_fraction": None, "macs_fraction": 1.0,
             "top1_before_ft": dense_top1, "top1_after_ft": dense_top1}
    base = statistics.median(cycles["dense"])
    table = []
    for r in [dense, *rows]:
        t = cycles["dense" if r is dense else f"{r['allocation']}-{r['budget']}"]
        table.append({"budget": r["budget"], "allocation": r["allocation"], "ms (median)": 1e3 * statistics.median(t),
                      "spread (min-max) ms": f"{1e3 * min(t):.2f}-{1e3 * max(t):.2f}",
                      "latency vs dense": statistics.median(t) / base, "in-stage": r["stage_latency_fraction"],
                      "MACs": r["macs_fraction"], "top-1 no FT": r["top1_before_ft"],
                      "top-1 after FT": r["top1_after_ft"]})
    return table


def _plot(rows: list[dict[str, Any]], dense_top1: float | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharex=True)
    for ax, key, title in zip(axes, ("top1_before_ft", "top1_after_ft"), ("before fine-tuning", "after fine-tuning")):
        for a, color in (("uniform", "#4878d0"), ("halp", "#ee854a")):
            pts = sorted((r["latency_vs_dense"], r[key]) for r in rows if r["allocation"] == a)
            if pts:
                ax.plot(*zip(*pts), "o-", color=color, label=a)
        if dense_top1 is not None:
            ax.axhline(dense_top1, color="gray", ls="--", lw=1, label="dense")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("onnxruntime latency vs dense (round-robin)")
        ax.set_ylabel("test top-1 (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}", flush=True)


if __name__ == "__main__":
    main()
