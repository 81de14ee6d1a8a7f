"""Accuracy against measured img/s for one trained model: dense, ToMe at several r, EViT at several
keep rates, and (with --pruned) the pruned model alone and with ToMe, training-free. Test top-1 in
torch; img/s in torch (eager) and in onnxruntime (each variant exported by effvision's ONNX export,
parity-checked), every variant timed round-robin in one process so load hits all alike. Table on
stdout; tokens.json, tokens.md and accuracy_vs_speed.png (one panel per runtime) in --out; the
table is filed in the results ledger (section token-reduction-curve) unless --no-ledger.

  .venv/bin/python scripts/token_reduction_curve.py runs/quickstart/01-train/model \
      --recipe recipes/quickstart.yaml --out runs/tokens_quickstart [--pruned runs/pc/03-finetune/model]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import matplotlib
import torch
from tqdm import tqdm

from effvision.bench import roundrobin, time_calls
from effvision.benchmarks.ledger import add_arguments, record
from effvision.dynamic import TokenReduceConfig, reduce_tokens_
from effvision.engine.evaluate import evaluate
from effvision.export import OnnxExportConfig, export_onnx
from effvision.models.io import load_model
from effvision.recipe import load_recipe
from effvision.engine.stage import build_recipe_loaders

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def variants(a: argparse.Namespace) -> list[tuple[str, str, TokenReduceConfig | None]]:
    out: list[tuple[str, str, TokenReduceConfig | None]] = [("dense", a.model_dir, None)]
    out += [(f"ToMe r={r}", a.model_dir, TokenReduceConfig(r=r)) for r in a.r]
    out += [(f"EViT keep={k}", a.model_dir, TokenReduceConfig(method="evit", keep_rate=k)) for k in a.keep]
    if a.pruned:
        out.append(("pruned", a.pruned, None))
        out += [(f"pruned + ToMe r={r}", a.pruned, TokenReduceConfig(r=r)) for r in a.pruned_r]
    return out


def torch_roundrobin(models: dict[str, torch.nn.Module], shape: tuple[int, ...], batch: int, rounds: int,
                     iters: int) -> dict[str, list[float]]:
    x = torch.randn(batch, *shape)
    rates: dict[str, list[float]] = {n: [] for n in models}
    with torch.no_grad():
        for _ in tqdm(range(rounds), desc="torch round-robin", leave=False):
            for n, m in models.items():
                t = time_calls(lambda: m(x), warmup=2, iters=iters, sync=lambda: None)
                rates[n].append(batch / statistics.median(t))
    return rates


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "torch_img_s", "torch eager"), (axes[1], "ort_img_s", "onnxruntime fp32")):
        for family, marker in (("dense", "o"), ("ToMe", "s"), ("EViT", "^"), ("pruned", "D")):
            pts = [r for r in rows if r["variant"].split(" ")[0] == family]
            if pts:
                ax.plot([r[key] for r in pts], [r["top1"] for r in pts], marker, linestyle="-", label=family)
                for r in pts:
                    ax.annotate(r["variant"].split(" ", 1)[-1] if family != "dense" else "", (r[key], r["top1"]),
                                fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel(f"{label} img/s (batch {rows[0]['batch']})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test top-1 (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--recipe", required=True, help="the recipe whose data section gives the test split")
    ap.add_argument("--pruned", default=None, help="a pruned model dir of the same model")
    ap.add_argument("--r", type=int, nargs="+", default=[2, 4, 6, 8])
    ap.add_argument("--keep", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    ap.add_argument("--pruned-r", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/token_reduction_curve")
    add_arguments(ap)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = torch.device("cpu")
    loaders = build_recipe_loaders(load_recipe(a.recipe), cpu)
    work = Path(tempfile.mkdtemp())
    models, files, rows = {}, {}, []
    for i, (name, src, cfg) in enumerate(tqdm(variants(a), desc="variants")):
        model, spec = load_model(src)
        model.eval()
        if cfg is not None:
            reduce_tokens_(model, cfg)
        shape = (spec.in_chans, spec.img_size, spec.img_size)
        top1 = evaluate(model, loaders.eval, cpu, "off")["top1"]
        files[name] = str(export_onnx(model, work / f"{i}.onnx", shape, OnnxExportConfig(parity_batch_sizes=[2])))
        models[name] = model
        rows.append({"variant": name, "top1": top1, "batch": a.batch_size})
    t_rates = torch_roundrobin(models, shape, a.batch_size, a.rounds, a.iters)
    o_rates = roundrobin(list(files.values()), "ort", a.rounds, batch_size=a.batch_size, warmup=3, iters=a.iters,
                         threads=a.threads)
    for r in rows:
        tv, ov = t_rates[r["variant"]], o_rates[files[r["variant"]]]
        r.update(torch_img_s=statistics.median(tv), ort_img_s=statistics.median(ov),
                 torch_spread=[min(tv), max(tv)], ort_spread=[min(ov), max(ov)])
    d = rows[0]
    lines = ["| variant | test top-1 | torch img/s (vs dense) | onnxruntime img/s (vs dense) |", "|---|---|---|---|"]
    for r in rows:
        r["torch_x"], r["ort_x"] = r["torch_img_s"] / d["torch_img_s"], r["ort_img_s"] / d["ort_img_s"]
        lines.append(f"| {r['variant']} | {r['top1']:.2f}% | {r['torch_img_s']:,.0f} ({r['torch_x']:.2f}x) | "
                     f"{r['ort_img_s']:,.0f} ({r['ort_x']:.2f}x) |")
    table = "\n".join(lines)
    load = os.getloadavg()[0]
    (out / "tokens.json").write_text(json.dumps({"model": a.model_dir, "pruned": a.pruned, "load_avg": load,
                                                 "rounds": a.rounds, "rows": rows}, indent=1))
    (out / "tokens.md").write_text(table + "\n")
    plot(rows, out / "accuracy_vs_speed.png", f"{a.model_dir}: batch {a.batch_size}, {a.threads} threads, "
                                              f"{os.cpu_count()} cores, load {load:.1f}")
    print(table)
    print(f"load average {load:.2f}; {out}")
    if not a.no_ledger:
        ledger_rows = [{"variant": r["variant"], "test top-1 (%)": r["top1"], "batch": r["batch"],
                        "torch img/s (median)": r["torch_img_s"], "torch spread (min-max)": _spread(r["torch_spread"]),
                        "torch vs dense": r["torch_x"], "onnxruntime img/s (median)": r["ort_img_s"],
                        "onnxruntime spread (min-max)": _spread(r["ort_spread"]), "onnxruntime vs dense": r["ort_x"],
                        "rounds": a.rounds} for r in rows]
        raw = {"model": a.model_dir, "pruned": a.pruned, "threads": a.threads, "iters": a.iters,
               "top1": {r["variant"]: r["top1"] for r in rows}, "torch_img_per_s_per_round": t_rates,
               "ort_img_per_s_per_round": {n: o_rates[f] for n, f in files.items()}}
        command = shlex.join(["python", "scripts/token_reduction_curve.py", *sys.argv[1:]])
        path = record("token-reduction-curve", ledger_rows, raw, command, "scripts/token_reduction_curve.py",
                      a.ledger_dir)
        print(f"ledger: {path}")


def _spread(lo_hi: list[float]) -> str:
    return f"{lo_hi[0]:,.0f}-{lo_hi[1]:,.0f}"


if __name__ == "__main__":
    main()
