"""Measured speed of the efficient backbones on this machine (`effvision models --bench cpu`).

MACs rank models badly for latency (depthwise convs, attention reshapes and memory traffic
cost time that MACs do not count), so a user should pick a backbone by a measurement on the
machine it will run on: each model's latency at one batch size in torch and onnxruntime, next
to its params and GMACs, as a table (markdown + JSON) and a plot with the Pareto set marked
(no other model is both larger and faster).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .errors import EffVisionError
from .models.catalog import model_cost

__all__ = ["bench_models", "pareto", "speed_markdown", "speed_plot", "write_speed_table"]


def bench_models(names: list[str], device: str = "cpu", backends: tuple[str, ...] = ("torch", "ort"),
                 batch_size: int = 1, warmup: int = 5, iters: int = 20, threads: int | None = None,
                 progress: bool = True) -> list[dict[str, Any]]:
    """One row per model: params, GMACs, and p50 latency / img/s per backend (or the error)."""
    from .bench import benchmark

    rows = []
    for name in tqdm(names, desc="models", unit="model", disable=not progress):
        cost = model_cost(name)
        row: dict[str, Any] = {"model": name, "params_m": round(cost.params_m, 3), "gmacs": round(cost.gmacs, 4),
                               "input": list(cost.input_size), "batch_size": batch_size}
        for backend in backends:
            try:
                r = benchmark(name, backend, device, batch_size, warmup=warmup, iters=iters, threads=threads)
            except Exception as e:  # one model that fails to export must not end the table
                row[f"{backend}_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"
                continue
            row[f"{backend}_ms"] = round(r["latency_ms_p50"], 3)
            row[f"{backend}_img_s"] = round(r["img_per_s"], 1)
        rows.append(row)
    return rows


def pareto(rows: list[dict[str, Any]], backend: str) -> list[str]:
    """Models that no other model beats on both latency (lower) and params (higher)."""
    timed = [r for r in rows if f"{backend}_ms" in r]
    return [r["model"] for r in timed
            if not any(o[f"{backend}_ms"] < r[f"{backend}_ms"] and o["params_m"] > r["params_m"] for o in timed)]


def speed_markdown(rows: list[dict[str, Any]], backends: tuple[str, ...], machine: str) -> str:
    head = ["model", "params (M)", "GMACs"] + [f"{b} ms" for b in backends] + ["Pareto"]
    fastest = backends[0]
    front = {b: set(pareto(rows, b)) for b in backends}
    lines = [f"Measured on {machine}, batch {rows[0]['batch_size'] if rows else '?'}, p50 latency; "
             f"sorted by {fastest} latency.\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: r.get(f"{fastest}_ms", float("inf"))):
        cells = [r["model"], f"{r['params_m']:.2f}", f"{r['gmacs']:.3f}"]
        cells += [f"{r[f'{b}_ms']:.2f}" if f"{b}_ms" in r else "failed" for b in backends]
        cells.append(", ".join(b for b in backends if r["model"] in front[b]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def speed_plot(rows: list[dict[str, Any]], backends: tuple[str, ...], path: Path, machine: str) -> Path | None:
    """Latency against GMACs per backend, Pareto models labelled; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(backends), figsize=(6 * len(backends), 4.5), squeeze=False)
    for ax, b in zip(axes[0], backends):
        timed = [r for r in rows if f"{b}_ms" in r]
        front = set(pareto(rows, b))
        ax.scatter([r["gmacs"] for r in timed], [r[f"{b}_ms"] for r in timed],
                   c=["tab:red" if r["model"] in front else "tab:blue" for r in timed], s=18)
        for r in timed:
            if r["model"] in front:
                ax.annotate(r["model"], (r["gmacs"], r[f"{b}_ms"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set(xlabel="GMACs", ylabel="p50 latency (ms)", title=f"{b} (red: Pareto, params vs latency)")
        ax.grid(alpha=0.3)
    fig.suptitle(machine, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_speed_table(rows: list[dict[str, Any]], backends: tuple[str, ...], out: Path, machine: str) -> dict[str, Path]:
    """models_speed.{json,md,png} in ``out`` (a new or empty folder: nothing is overwritten)."""
    if out.exists() and any(out.iterdir()):
        raise EffVisionError(f"{out} exists and is not empty; choose another --out (nothing was overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "models_speed.json", "md": out / "models_speed.md"}
    paths["json"].write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    paths["md"].write_text(speed_markdown(rows, backends, machine))
    png = speed_plot(rows, backends, out / "models_speed.png", machine)
    if png is not None:
        paths["png"] = png
    return paths
