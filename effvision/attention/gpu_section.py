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

__all__ = ["sparse_attention_section", "sparse_attention_markdown"]


def _mask(h: int, nb: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(h, nb, nb, generator=g) < density
    m |= torch.eye(nb, dtype=torch.bool)  # no empty rows
    return m


def _flex(q, k, v, bm: torch.Tensor, block: int) -> Callable[[], torch.Tensor] | None:
    try:  # FlexAttention: PyTorch's own Triton block-sparse attention, compiled on CUDA
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    n = q.shape[2]

    def mask_mod(b, h, qi, ki):
        return bm[h, qi // block, ki // block]

    mask = create_block_mask(mask_mod, None, q.shape[1], n, n, device=str(q.device), BLOCK_SIZE=block)
    fn = torch.compile(flex_attention) if q.is_cuda else flex_attention
    return lambda: fn(q, k, v, block_mask=mask)


def _time(fn: Callable[[], torch.Tensor], backward: bool, iters: int, sync) -> float:
    def call():
        out = fn()
        if backward:
            out.sum().backward()
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
                flex = _flex(q, k, v, bm, block)
                if flex is not None:
                    backends["flex_attention"] = flex
            except Exception as e:  # noqa: BLE001  (report, don't lose the other rows)
                rows.append({"n": n, "density": density, "backend": "flex_attention", "error": repr(e)[:200]})
            times = {}
            for name, fn in backends.items():
                try:
                    times[name] = (_time(fn, False, 3 if toy else 20, sync), _time(fn, True, 3 if toy else 20, sync))
                except Exception as e:  # noqa: BLE001
                    rows.append({"n": n, "density": density, "backend": name, "error": repr(e)[:200]})
            base = times.get("sdpa dense")
            for name, (fwd, fb) in times.items():
                row = {"n": n, "density": round(bm.float().mean().item(), 3), "backend": name, "fwd_ms": fwd,
                       "fwd_bwd_ms": fb, "fwd_speedup": base[0] / fwd if base else None,
                       "fwd_bwd_speedup": base[1] / fb if base else None}
                rows.append(row)
                print(f"  sparse_attention N={n} density {row['density']} {name:16s} fwd {fwd:.3f} ms "
                      f"fwd+bwd {fb:.3f} ms", flush=True)
    return rows


def sparse_attention_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| N | block density | backend | fwd ms | fwd+bwd ms | fwd speedup | fwd+bwd speedup |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['density']} | {r['backend']} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {r['n']} | {r['density']} | {r['backend']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                         f"{r['fwd_speedup']:.2f}x | {r['fwd_bwd_speedup']:.2f}x |")
    lines.append("")
    return lines
