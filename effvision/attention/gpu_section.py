"""gpu_bench section "sparse_attention": the block-sparse kernel against dense SDPA and
FlexAttention (same block mask), forward and forward+backward, at deit_small's head shape
(H 6, D 64), bf16, N = 197 / 1,024 / 4,096, block densities 0.5 and 1.0. Targets (issue 12):
at N >= 1,024 and 50% density forward >= 1.8x SDPA and fwd+bwd >= 1.5x; at full density
>= 0.9x SDPA. ``args.toy``: the same code on the CPU at toy size (reference path), for tests."""
from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..bench import time_calls
from ..kernels.block_sparse_attention import block_sparse_attention
from .backends import flex_attend, flex_block_mask, pick_backend

__all__ = ["sparse_attention_section", "sparse_attention_markdown"]


def _mask(h: int, nb: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(h, nb, nb, generator=g) < density
    m |= torch.eye(nb, dtype=torch.bool)  # no empty rows
    return m


def _flex(q, k, v, bm: torch.Tensor, block: int) -> Callable[[], torch.Tensor]:
    # the policy layer's FlexAttention backend: compiled on CUDA, eager (forward only) on the CPU
    mask = flex_block_mask(bm, q.shape[2], block)
    return lambda: flex_attend(q, k, v, mask, 1.0 / q.shape[-1] ** 0.5)


def _time(fn: Callable[[], torch.Tensor], backward: bool, iters: int, sync) -> float:
    def call():
        if not backward:
            with torch.no_grad():
                return fn()
        fn().sum().backward()
    return 1e3 * statistics.median(time_calls(call, warmup=3, iters=iters, sync=sync))


def sparse_attention_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    toy = getattr(args, "toy", False)
    dev = torch.device("cpu" if toy else "cuda")
    dtype = torch.float32 if toy else torch.bfloat16
    b, h, d, block = (1, 2, 32, 16) if toy else (8, 6, 64, 64)
    sync = (lambda: None) if toy else torch.cuda.synchronize
    rows: list[dict[str, Any]] = []
    for n in ((40,) if toy else (197, 1024, 4096)):
        nb = -(-n // block)
        for density in (0.5, 1.0):
            bm = _mask(h, nb, density).to(dev)
            q, k, v = [torch.randn(b, h, n, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3)]
            backends = {"sdpa dense": lambda: F.scaled_dot_product_attention(q, k, v),
                        "effvision kernel": lambda: block_sparse_attention(q, k, v, bm, block=block)}
            try:
                backends["flex_attention"] = _flex(q, k, v, bm, block)
            except Exception as e:  # noqa: BLE001  (report, don't lose the other rows)
                rows.append({"n": n, "density": density, "backend": "flex_attention", "error": repr(e)[:200]})
            times = {}
            for name, fn in backends.items():
                # FlexAttention has no backward on the CPU: forward only there
                no_bwd = name == "flex_attention" and not q.is_cuda
                try:
                    times[name] = (_time(fn, False, 3 if toy else 20, sync),
                                   None if no_bwd else _time(fn, True, 3 if toy else 20, sync))
                except Exception as e:  # noqa: BLE001
                    rows.append({"n": n, "density": density, "backend": name, "error": repr(e)[:200]})
            base = times.get("sdpa dense")
            for name, (fwd, fb) in times.items():
                row = {"n": n, "density": round(bm.float().mean().item(), 3), "backend": name, "fwd_ms": fwd,
                       "fwd_bwd_ms": fb, "fwd_speedup": base[0] / fwd if base else None,
                       "fwd_bwd_speedup": base[1] / fb if base and fb else None}
                rows.append(row)
                print(f"  sparse_attention N={n} density {row['density']} {name:16s} fwd {fwd:.3f} ms "
                      f"fwd+bwd {_f(fb, ' ms')}", flush=True)
    return rows


def _f(v: float | None, unit: str = "", digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}{unit}"


def sparse_attention_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| N | block density | backend | fwd ms | fwd+bwd ms | fwd speedup | fwd+bwd speedup |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['density']} | {r['backend']} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {r['n']} | {r['density']} | {r['backend']} | {r['fwd_ms']:.3f} | {_f(r['fwd_bwd_ms'])} | "
                         f"{_f(r['fwd_speedup'], 'x', 2)} | {_f(r['fwd_bwd_speedup'], 'x', 2)} |")
    fastest: dict[tuple[int, float], tuple[float, str]] = {}
    for r in rows:
        if "error" not in r and r["backend"] != "sdpa dense":
            key = (r["n"], r["density"])
            fastest[key] = min(fastest.get(key, (float("inf"), "")), (r["fwd_ms"], r["backend"]))
    if fastest:
        lines += ["", "Fastest sparse backend (forward) per shape, and what `backend: auto` picks "
                      "(effvision.attention.backends.CUDA_RULES; update the table from these rows):", ""]
        for (n, d), (_, name) in sorted(fastest.items()):
            lines.append(f"- N {n}, density {d}: {name}; auto: {pick_backend('auto', n, torch.device('cuda'))}")
    lines.append("")
    return lines
