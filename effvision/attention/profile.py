"""Profiling: per head, the cheapest policy (in kernel blocks) that keeps at least
``recovery`` of the head's attention mass on calibration images (FastGen's criterion)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention
from tqdm import tqdm

from ..errors import ConfigError
from .backends import BACKENDS, Backend
from .policies import Grid, block_cover, policy_token_mask

__all__ = ["SparseAttentionConfig", "attention_maps", "candidates", "choose_policies"]


@dataclass
class SparseAttentionConfig:
    """Block-sparse attention: per head, the cheapest candidate policy (windows of ``radii``,
    ``strides``, ``heavy_fractions``) keeping ``recovery`` of its attention mass on calibration
    images, and the kernel backend that runs it."""

    recovery: float = 0.95                  # fraction of each head's attention mass to keep, in (0, 1]
    block: int = 64                         # kernel block (tokens); the unit policies are costed in
    radii: list[int] = field(default_factory=lambda: [1, 2, 3])
    strides: list[int] = field(default_factory=lambda: [2, 4])
    heavy_fractions: list[float] = field(default_factory=lambda: [0.1, 0.25])
    calib_batches: int = 4
    backend: Backend = "auto"               # kernel / flex / sdpa, or auto: per shape (backends.CUDA_RULES)

    def validate(self, where: str = "sparse_attention") -> None:
        if not 0.0 < self.recovery <= 1.0:
            raise ConfigError(f"{where}.recovery must be in (0, 1], got {self.recovery}")
        if self.block < 16 or self.block & (self.block - 1):
            raise ConfigError(f"{where}.block must be a power of two >= 16, got {self.block}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"{where}.backend must be one of {', '.join(BACKENDS)}, got '{self.backend}'")
        if self.calib_batches < 1 or any(r < 1 for r in self.radii) or any(s < 2 for s in self.strides) \
                or any(not 0 < f < 1 for f in self.heavy_fractions):
            raise ConfigError(f"{where}: calib_batches >= 1, radii >= 1, strides >= 2, heavy_fractions in (0, 1)")


def _attn_probs(mod: Attention, x: torch.Tensor) -> torch.Tensor:
    """Recompute a timm Attention's softmax probabilities for input x: (B, H, N, N)."""
    b, n, _ = x.shape
    qkv = mod.qkv(x).reshape(b, n, 3, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = mod.q_norm(q), mod.k_norm(k)
    return ((q * mod.scale) @ k.transpose(-2, -1)).softmax(-1)


@torch.no_grad()
def attention_maps(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu"
                   ) -> dict[str, torch.Tensor]:
    """Mean attention probabilities per Attention module over the calibration images: name -> (H, N, N)."""
    sums: dict[str, torch.Tensor] = {}
    count = [0]
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, Attention):
            def hook(m, args, name=name):
                p = _attn_probs(m, args[0]).sum(0)
                sums[name] = sums[name] + p if name in sums else p
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        model.eval()
        for x in tqdm(batches, desc="profile attention", unit="batch"):
            x = x.to(device)
            model(x)
            count[0] += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
    return {k: v / count[0] for k, v in sums.items()}


def candidates(grid: Grid, cfg: SparseAttentionConfig, col_mass: torch.Tensor) -> list[dict[str, Any]]:
    """Candidate policies for one head; heavy hitters come from that head's column mass (N,)."""
    out: list[dict[str, Any]] = []
    specials = ["special"] if grid.prefix else []
    out += [{"kind": k} for k in specials]
    for r in cfg.radii:
        out += [{"kind": "local", "radius": r}] + [{"kind": f"{k}+local", "radius": r} for k in specials]
    for s in cfg.strides:
        out.append({"kind": "strided", "stride": s})
    for f in cfg.heavy_fractions:
        cols = col_mass.topk(max(1, int(f * grid.n))).indices.sort().values.tolist()
        out += [{"kind": "heavy", "cols": cols}] + [{"kind": f"{k}+heavy", "cols": cols} for k in specials]
    out.append({"kind": "full"})
    return out


def choose_policies(maps: dict[str, torch.Tensor], grid: Grid, cfg: SparseAttentionConfig) -> dict[str, Any]:
    """name -> list (one per head) of {"policy", "density", "kept"}: the cheapest policy whose block
    cover keeps >= cfg.recovery of the head's mean attention mass (ties: more mass kept)."""
    cfg.validate()
    chosen: dict[str, Any] = {}
    covers: dict[str, torch.Tensor] = {}     # block cover per policy: the same for every head but heavy ones
    for name, a in maps.items():                                   # a: (H, N, N), rows sum to 1
        h, n, _ = a.shape
        if n != grid.n:
            raise ConfigError(f"{name}: attention over {n} tokens but the grid has {grid.n}")
        nb = -(-n // cfg.block)
        pad = nb * cfg.block - n
        # mass per (query block, key block): a cover's kept mass is a sum over its blocks
        mass = torch.nn.functional.pad(a, (0, pad, 0, pad)).reshape(h, nb, cfg.block, nb, cfg.block).sum((2, 4))
        heads = []
        for i in range(h):
            best = None
            for pol in candidates(grid, cfg, a[i].sum(0)):
                key = json.dumps(pol, sort_keys=True)
                if key not in covers:
                    covers[key] = block_cover(policy_token_mask(pol, grid), cfg.block)
                bm = covers[key]
                kept = (mass[i] * bm).sum().item() / n
                cost = (bm.float().mean().item(), -kept)
                if kept >= cfg.recovery - 1e-6 and (best is None or cost < best[0]):
                    best = (cost, pol, kept)
            assert best is not None  # "full" keeps all the mass
            heads.append({"policy": best[1], "density": best[0][0], "kept": best[2]})
        chosen[name] = heads
    return chosen
