"""The race's table (markdown) and plot (img/s per contender and batch size, relative to
onnxruntime fp32, with each contender's spread over rounds)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["race_markdown", "race_plot"]


def _cell(entry: dict[str, Any], batch: str, winner: bool) -> str:
    t = entry.get("timings", {}).get(batch)
    if t is None:
        return "-"
    lo, hi = t["spread_img_per_s"]
    text = f"{t['img_per_s']:,.1f} ({t['vs_ort_fp32']:.2f}x; {lo:,.0f}-{hi:,.0f})"
    return f"**{text}**" if winner else text


def _check_cells(entry: dict[str, Any]) -> list[str]:
    c = entry.get("checks")
    if c is None:
        return ["-", "-"]
    sqnr = "inf" if c["sqnr_db"] == float("inf") else f"{c['sqnr_db']:.1f}"
    return [sqnr, f"{c['top1_agreement']:.1%}"]


def race_markdown(report: dict[str, Any]) -> str:
    """One row per contender: status, checks, img/s per batch (x onnxruntime fp32; spread)."""
    batches = list(report["winners"])
    lines = [f"# CPU runtime race: {report['model']}", "",
             f"Machine: {report['machine'].get('cpu')} ({report['machine'].get('cpu_count')} cores, "
             f"{report['threads']} threads). Check images: {report['images']}. Timings: "
             f"{'read from the record of an earlier run' if report['timings']['reused'] else 'measured now'} "
             f"({report['settings']['rounds']} rounds). Winner in bold.", "",
             "| contender | precision | status | logit SQNR dB | top-1 agreement | "
             + " | ".join(f"img/s batch {b} (x ort fp32; spread)" for b in batches) + " |",
             "|---|---|---|---|---|" + "---|" * len(batches)]
    for name, e in report["contenders"].items():
        status = e["status"] + (f": {e['reason']}" if e.get("reason") else "")
        cells = [_cell(e, b, report["winners"][b] == name) for b in batches]
        lines.append(f"| {name} | {e.get('precision', '-')} | {status} | " + " | ".join(_check_cells(e)) + " | "
                     + " | ".join(cells) + " |")
    lines += ["", "Winners: " + ", ".join(f"batch {b}: {n}" for b, n in report["winners"].items())]
    if "int8" in report:
        lines.append("No INT8 contender passed its check; fp32 ships. Why: "
                     + "; ".join(f"{n}: {r}" for n, r in report["int8"]["why"].items()))
    return "\n".join(lines) + "\n"


def race_plot(report: dict[str, Any], path: Path) -> str | None:
    """Grouped bars, one group per batch size; None (and no file) where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    timed = {n: e for n, e in report["contenders"].items() if "timings" in e}
    batches = list(report["winners"])
    fig, ax = plt.subplots(figsize=(3.5 + 0.55 * len(timed) * len(batches), 4))
    width = 0.8 / len(timed)
    for i, (name, e) in enumerate(timed.items()):
        xs = [j + i * width for j in range(len(batches))]
        ratios = [e["timings"][b]["vs_ort_fp32"] for b in batches]
        base = [e["timings"][b]["img_per_s"] / e["timings"][b]["vs_ort_fp32"] for b in batches]
        lo = [r - e["timings"][b]["spread_img_per_s"][0] / s for r, b, s in zip(ratios, batches, base)]
        hi = [e["timings"][b]["spread_img_per_s"][1] / s - r for r, b, s in zip(ratios, batches, base)]
        ax.bar(xs, ratios, width, yerr=[lo, hi], capsize=2, label=name)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("img/s relative to onnxruntime fp32")
    ax.set_title(f"{report['model']}: CPU runtime race ({report['machine'].get('cpu_count')} cores)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
