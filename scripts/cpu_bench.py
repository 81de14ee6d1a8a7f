"""CIFAR-10 compression benchmark on a CPU: one dense small ViT trained under a time budget, then
its compressed variants, every one exported and timed in onnxruntime side by side.

Variants (each an effvision recipe run under OUT/, written to OUT/recipes/):
  dense           train for --dense-budget seconds -> eval -> export (the teacher; cached)
  dense_int8      INT8 PTQ of dense (onnxruntime CPU form) -> eval -> export
  pruned          prune dense to --latency-fraction of its onnxruntime latency -> fine-tune alone
  pruned_kd       the same pruned model -> fine-tune distilled from dense (cached teacher logits), same budget
  pruned_kd_int8  INT8 PTQ of pruned_kd
  dense_evit0.5_kd  (with --tokens evit:0.5 or tome:8) token reduction on dense, then the same
                  distilled fine-tune
Then test top-1 of every exported ONNX in onnxruntime (the file that is timed), img/s round-robin
in one process at batch 32 and batch 1, and a table (cpu_bench.md, cpu_bench.json) and a plot of
accuracy against img/s (cpu_bench.png) in OUT.

The table is also filed in the results ledger (bench/results/, section cpu-bench) with every
round's img/s, unless --no-ledger.

Finished runs are reused (effvision skips finished stages; an interrupted one resumes), so a rerun
only re-times, and changing a setting under the same OUT is refused (use another --out).

    scripts/cpu_bench.sh [--out runs/cpu_bench] [--dense-budget 600] [--finetune-budget 180]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from effvision.benchmarks.ledger import add_arguments, record

ROOT = Path(__file__).resolve().parents[1]


def _recipe(args: argparse.Namespace, name: str, stages: list[dict[str, Any]], init: str | None = None) -> dict[str, Any]:
    return {"name": f"cpu_bench_{name}", "seed": 0, "device": "cpu", "threads": args.threads,
            "model": {"name": args.model, "kwargs": {}, **({"init_from": init} if init else {})},
            # hflip only: a few epochs gain nothing from crops, and the cached teacher logits (of the
            # un-augmented image) then differ from the student's view by a flip at most.
            "data": {"name": "cifar10", "root": str(args.data), "img_size": 32, "batch_size": 128,
                     "eval_batch_size": 1000, "limit_train": args.limit_train, "limit_eval": args.limit_eval,
                     "augment": {"crop_padding": 0, "hflip": True}},
            "stages": stages}


def _train(budget: float, lr: float, distill: dict[str, Any] | None = None) -> dict[str, Any]:
    stage: dict[str, Any] = {"type": "finetune" if distill else "train", "epochs": 200, "budget_s": budget,
                             "optimizer": {"name": "adamw", "lr": lr, "weight_decay": 0.05},
                             "scheduler": {"name": "cosine", "warmup_epochs": 2}, "label_smoothing": 0.1,
                             "eval_every": 0, "log_every": 50}
    if distill:
        stage["distill"] = distill
    return stage


QUANTIZE = {"type": "quantize", "precision": "int8", "target": "ort-cpu", "calib_method": "percentile",
            "calib_batches": 8}
TAIL = [{"type": "eval"}, {"type": "export", "format": "onnx", "opset": 18}]


def variants(args: argparse.Namespace, out: Path) -> list[tuple[str, dict[str, Any]]]:
    dense_model = str((out / "dense" / "01-train" / "model").resolve())
    if args.dense_run is not None:  # link a finished dense run instead of training another
        link = out / "dense"
        if not link.exists():
            link.symlink_to(args.dense_run.resolve(), target_is_directory=True)
        elif link.resolve() != args.dense_run.resolve():
            raise SystemExit(f"cpu_bench: {link} exists and is not {args.dense_run}; choose another --out")
    prune = {"type": "prune", "criterion": "taylor", "calib_batches": 4, "round_to": 8,
             "budget": {"metric": "latency", "backend": "ort", "fraction": args.latency_fraction,
                        **({"allocation": args.allocation} if args.allocation != "uniform" else {})},
             # HALP also chooses the embedding width and drops whole blocks (depth, a HALP-only kind)
             "budget_kinds": ["heads", "mlp", "width", *(["depth"] if args.allocation == "halp" else [])]}
    kd = {"teacher": dense_model, "kind": "soft", "alpha": 1.0, "temperature": 2.0, "cache_logits": True}
    ft = args.finetune_budget
    out_v = [
        ("dense", _recipe(args, "dense", [_train(args.dense_budget, 2e-3), *TAIL])),
        ("dense_int8", _recipe(args, "dense_int8", [QUANTIZE, *TAIL], init=dense_model)),
        ("pruned", _recipe(args, "pruned", [prune, _train(ft, 1e-3), *TAIL], init=dense_model)),
        # the very student `pruned` fine-tunes alone: its prune stage's model
        ("pruned_kd", _recipe(args, "pruned_kd", [_train(ft, 1e-3, kd), *TAIL],
                              init=str((out / "pruned" / "01-prune" / "model").resolve()))),
        ("pruned_kd_int8", _recipe(args, "pruned_kd_int8", [QUANTIZE, *TAIL],
                                   init=str((out / "pruned_kd" / "01-finetune" / "model").resolve()))),
    ]
    for spec in args.tokens:  # token reduction on the dense model, then the same distilled fine-tune
        method, _, value = spec.partition(":")
        if method not in ("tome", "evit") or not value:
            raise SystemExit(f"cpu_bench: --tokens {spec}: expected tome:R or evit:KEEP_RATE")
        stage = {"type": "reduce_tokens", "method": method,
                 **({"r": int(value)} if method == "tome" else {"keep_rate": float(value)})}
        name = f"dense_{method}{value}_kd"
        out_v.append((name, _recipe(args, name, [stage, _train(ft, 5e-4, kd), *TAIL], init=dense_model)))
    return out_v


def run_variant(out: Path, name: str, recipe: dict[str, Any]) -> Path:
    """The run's exported ONNX file; a finished run is reused, an interrupted one resumed."""
    path = out / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    cmd = [sys.executable, "-m", "effvision", "run", str(path), "--out", str(out / name), "--resume"]
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise SystemExit(f"cpu_bench: variant {name} failed (command: {' '.join(cmd)})")
    n = len(recipe["stages"])
    return out / name / f"{n:02d}-export" / "model.onnx"


def ort_top1(onnx_path: Path, args: argparse.Namespace, spec: dict[str, Any]) -> float:
    """Test top-1 of the exported file itself in onnxruntime (the INT8 graph, not the fake-quant model)."""
    import numpy as np
    import onnxruntime as ort

    from effvision.data.build import load_arrays
    from effvision.data.config import DataConfig

    cfg = DataConfig(name="cifar10", root=str(args.data), limit_eval=args.limit_eval, limit_train=args.limit_train)
    test = load_arrays(cfg)["test"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    mean = np.array(spec["mean"], dtype=np.float32).reshape(1, -1, 1, 1) * 255
    std = np.array(spec["std"], dtype=np.float32).reshape(1, -1, 1, 1) * 255
    correct = 0
    for i in range(0, len(test), 500):
        x = (test.images[i:i + 500].numpy().astype(np.float32) - mean) / std
        correct += int((sess.run(None, {name: x})[0].argmax(1) == test.labels[i:i + 500].numpy()).sum())
    return 100.0 * correct / len(test)


def _summary(run: Path, stage: str) -> dict[str, Any]:
    hits = sorted(run.glob(f"*-{stage}/summary.json"))
    return json.loads(hits[0].read_text()) if hits else {}


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        ax.scatter(r["img_per_s_b32"], r["top1_ort"], s=40)
        ax.annotate(r["variant"], (r["img_per_s_b32"], r["top1_ort"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("onnxruntime img/s, batch 32 (log)")
    ax.set_ylabel("CIFAR-10 test top-1 (%), onnxruntime")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/cpu_bench"))
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "cifar10")
    p.add_argument("--model", default="vit_micro_patch4_32")
    p.add_argument("--dense-budget", type=float, default=600.0, help="training seconds of the dense model")
    p.add_argument("--finetune-budget", type=float, default=180.0, help="training seconds of each pruned fine-tune")
    p.add_argument("--dense-run", type=Path, default=None,
                   help="a finished cpu_bench dense run (OUT/dense of an earlier run) to reuse instead of training")
    p.add_argument("--allocation", choices=["uniform", "halp"], default="uniform",
                   help="how the latency budget is spread over layers (prune budget.allocation; halp: heads and "
                        "MLP units per block, one embedding width, whole blocks dropped)")
    p.add_argument("--latency-fraction", type=float, default=0.4, help="pruned onnxruntime latency / dense")
    p.add_argument("--tokens", nargs="*", default=[], metavar="tome:R|evit:KEEP",
                   help="also: token reduction of dense (ToMe r or EViT keep rate) + the distilled fine-tune")
    p.add_argument("--rounds", type=int, default=7, help="round-robin rounds of the timing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit-train", type=int, default=None, help="use only N training images (smoke runs)")
    p.add_argument("--limit-eval", type=int, default=None)
    add_arguments(p)
    args = p.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"cpu_bench: CIFAR-10 not found at {args.data} (--data; ../shared/datasets/README.md)")
    from tqdm import tqdm

    from effvision.bench import roundrobin

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    onnx: dict[str, Path] = {}
    todo = variants(args, out)
    with tqdm(todo, desc="cpu_bench", unit="variant") as bar:
        for name, recipe in bar:
            bar.set_postfix_str(name)
            tqdm.write(f"cpu_bench: {name}")
            onnx[name] = run_variant(out, name, recipe)
    spec = json.loads((out / "dense" / "01-train" / "model" / "model.json").read_text())
    tqdm.write("cpu_bench: onnxruntime top-1 of every exported model")
    top1 = {n: ort_top1(f, args, spec) for n, f in tqdm(onnx.items(), desc="ort top-1", leave=False)}
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    files = [str(f) for f in onnx.values()]
    timing = {b: roundrobin(files, "ort", args.rounds, batch_size=b, warmup=5, iters=30 if b > 1 else 200,
                            threads=args.threads) for b in (32, 1)}
    rows = []
    for name, f in onnx.items():
        run = out / name
        model_summary = _summary(run, "finetune") or _summary(run, "train") or _summary(run, "quantize")
        row = {"variant": name, "top1_ort": top1[name], "top1_torch": _summary(run, "eval").get("top1"),
               "params_m": _summary(run, "eval").get("params_m"), "gmacs": _summary(run, "eval").get("gmacs"),
               "train_s": model_summary.get("budget_used_s"), "steps": model_summary.get("steps_done"),
               "prune": {k: v for k, v in _summary(run, "prune").items() if k in ("macs_fraction", "params_fraction")}}
        for b in (32, 1):
            v = timing[b][str(f)]
            row[f"img_per_s_b{b}"] = statistics.median(v)
            row[f"spread_b{b}"] = [min(v), max(v)]
        rows.append(row)
    base = {b: rows[0][f"img_per_s_b{b}"] for b in (32, 1)}
    for r in rows:
        for b in (32, 1):
            r[f"speedup_b{b}"] = r[f"img_per_s_b{b}"] / base[b]
        r["delta_top1"] = r["top1_ort"] - rows[0]["top1_ort"]
    load = os.getloadavg()
    meta = {"machine": f"{os.cpu_count()} cores", "load_avg": load, "threads": args.threads, "rounds": args.rounds,
            "dense_budget_s": args.dense_budget, "finetune_budget_s": args.finetune_budget,
            "latency_fraction": args.latency_fraction, "model": args.model, "wall_s": time.perf_counter() - t0}
    (out / "cpu_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| variant | params (M) | test top-1, ORT (delta) | ORT img/s b32 (vs dense) | ORT img/s b1 (vs dense) |",
             "|---|---|---|---|---|"]
    for r in rows:
        pm = f"{r['params_m']:.3f}" if r["params_m"] is not None else "-"
        lines.append(f"| {r['variant']} | {pm} | {r['top1_ort']:.2f}% ({r['delta_top1']:+.2f}) | "
                     f"{r['img_per_s_b32']:,.0f} ({r['speedup_b32']:.2f}x) | {r['img_per_s_b1']:,.0f} "
                     f"({r['speedup_b1']:.2f}x) |")
    table = "\n".join(lines)
    (out / "cpu_bench.md").write_text(table + "\n")
    plot(rows, out / "cpu_bench.png", f"CIFAR-10, {args.model}, {meta['machine']}, onnxruntime {args.threads} threads")
    print(table)
    print(f"cpu_bench: {meta['wall_s'] / 60:.1f} min, load average {load[0]:.2f}; "
          f"{out / 'cpu_bench.md'}, {out / 'cpu_bench.png'}")
    if not args.no_ledger:
        table_rows = []
        for r in rows:
            row = {"variant": r["variant"], "params (M)": r["params_m"], "test top-1 ORT (%)": r["top1_ort"],
                   "top-1 vs dense": r["delta_top1"]}
            for b in (32, 1):
                lo, hi = r[f"spread_b{b}"]
                row.update({f"ORT img/s b{b} (median)": r[f"img_per_s_b{b}"],
                            f"b{b} spread (min-max)": f"{lo:,.0f}-{hi:,.0f}", f"b{b} vs dense": r[f"speedup_b{b}"]})
            table_rows.append({**row, "rounds": args.rounds})
        raw = {"img_per_s_per_round": {f"batch {b}": {n: timing[b][str(f)] for n, f in onnx.items()} for b in (32, 1)},
               "top1_ort": top1, "meta": meta}
        # cpu_bench.sh is the entry point: it only picks the interpreter and runs this file with the same arguments
        command = shlex.join(["scripts/cpu_bench.sh", *sys.argv[1:]])
        print(f"ledger: {record('cpu-bench', table_rows, raw, command, 'scripts/cpu_bench.py', args.ledger_dir)}")


if __name__ == "__main__":
    main()
