"""The bench stage: the newest model (and its ONNX export) on each backend, side by side."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..bench import BACKENDS, benchmark
from ..errors import ConfigError
from ..io import atomic_write_json
from ..engine.stage import Stage, register_stage

__all__ = ["BenchConfig", "BenchStage", "plot_throughput"]


@dataclass
class BenchConfig:
    """The ``bench`` stage: throughput and latency of the newest model (its ONNX export for the
    ``ort`` backend, where there is one) on each backend, optionally beside an earlier stage's model."""

    type: str = "bench"
    backends: list[str] = field(default_factory=lambda: ["torch", "ort"])
    device: Literal["cpu", "cuda"] = "cpu"
    batch_size: int = 32
    warmup: int = 10
    iters: int = 50
    threads: int | None = None
    baseline: str | None = None      # an earlier stage of this run (e.g. "01-train"), benched side by side

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
            if cfg.baseline is not None:  # right after ours, so both see the same machine load
                b = self._baseline(cfg, backend)
                r["speedup_vs_baseline"] = r["img_per_s"] / b["img_per_s"]
                results.append(b)
        atomic_write_json(ctx.stage_dir / "bench.json", results)
        plot_throughput(results, ctx.stage_dir / "bench.png", f"{ctx.recipe.model.name}, batch {cfg.batch_size}")
        base = results[0]["img_per_s"]
        summary = {"results": results, "speedup_vs_first": {r["backend"]: r["img_per_s"] / base for r in results}}
        if cfg.baseline is not None:
            summary["speedup_vs_baseline"] = {r["backend"]: r["speedup_vs_baseline"] for r in results
                                              if "speedup_vs_baseline" in r}
        return summary

    def _baseline(self, cfg: BenchConfig, backend: str) -> dict[str, Any]:
        from ..errors import EffVisionError

        model_dir = self.ctx.run_dir / str(cfg.baseline) / "model"
        if not (model_dir / "model.json").is_file():
            raise EffVisionError(f"bench.baseline: {model_dir} has no model (name an earlier stage, e.g. 01-train)")
        r = benchmark(str(model_dir), backend, cfg.device, cfg.batch_size, warmup=cfg.warmup, iters=cfg.iters,
                      threads=cfg.threads)
        r["backend"] = f"{backend} {cfg.baseline}"
        print(f"  {r['backend']:8s} {r['img_per_s']:10.1f} img/s  p50 {r['latency_ms_p50']:.2f} ms")
        return r


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
