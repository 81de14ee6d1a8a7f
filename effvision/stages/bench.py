"""The bench stage: the newest model (and its ONNX export) on each backend, side by side."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..bench import BACKENDS, benchmark
from ..errors import ConfigError
from ..io import atomic_write_json
from .base import Stage, register_stage

__all__ = ["BenchConfig", "BenchStage", "plot_throughput"]


@dataclass
class BenchConfig:
    type: str = "bench"
    backends: list[str] = field(default_factory=lambda: ["torch", "ort"])
    device: Literal["cpu", "cuda"] = "cpu"
    batch_size: int = 32
    warmup: int = 10
    iters: int = 50
    threads: int | None = None

    def validate(self, where: str) -> None:
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad:
            raise ConfigError(f"{where}.backends: unknown {bad} (available: {', '.join(BACKENDS)})")
        if self.batch_size <= 0 or self.iters <= 0 or self.warmup < 0:
            raise ConfigError(f"{where}: batch_size and iters must be positive, warmup non-negative")


@register_stage
class BenchStage(Stage):
    type = "bench"
    Config = BenchConfig

    def run(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        model_dir = ctx.previous_model_dir()
        onnx = ctx.previous_stage_file("model.onnx")
        results = []
        for backend in cfg.backends:
            target = str(onnx) if backend == "ort" and onnx is not None else str(model_dir)
            r = benchmark(target, backend, cfg.device, cfg.batch_size, warmup=cfg.warmup, iters=cfg.iters,
                          threads=cfg.threads)
            print(f"  {backend:8s} {r['img_per_s']:10.1f} img/s  p50 {r['latency_ms_p50']:.2f} ms")
            results.append(r)
        atomic_write_json(ctx.stage_dir / "bench.json", results)
        plot_throughput(results, ctx.stage_dir / "bench.png", f"{ctx.recipe.model.name}, batch {cfg.batch_size}")
        base = results[0]["img_per_s"]
        return {"results": results, "speedup_vs_first": {r["backend"]: r["img_per_s"] / base for r in results}}


def plot_throughput(results: list[dict[str, Any]], path, title: str) -> None:
    """Bar chart of img/s per backend (skipped when matplotlib is absent)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3))
    labels = [f"{r['backend']}\n{r['device']}" for r in results]
    ax.bar(labels, [r["img_per_s"] for r in results], color="#4878d0")
    ax.set_ylabel("images / s")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
