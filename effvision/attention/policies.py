"""Per-head attention policies on the token grid (FastGen's policies, for vision tokens).

A policy is a small JSON-able dict: ``{"kind": k, ...}`` with k in special / local (radius r,
Chebyshev distance on the 2-D patch grid) / heavy (the ``cols`` heavy-hitter columns) /
strided (every ``stride``-th row and column of the grid) / full, or a composition
``{"kind": "special+local", ...}``. Its token mask is then covered by kernel blocks: the
attention that runs (and the mass profiling measures, and the cost it counts) is that of the
block mask, so every backend computes the same thing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Grid", "policy_token_mask", "block_cover", "expand_blocks"]


@dataclass(frozen=True)
class Grid:
    prefix: int   # special tokens (CLS / registers) before the patch tokens
    h: int
    w: int

    @property
    def n(self) -> int:
        return self.prefix + self.h * self.w


def _patch_coords(grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(grid.h), torch.arange(grid.w), indexing="ij")
    return ys.reshape(-1), xs.reshape(-1)


def _one(kind: str, p: dict[str, Any], grid: Grid) -> torch.Tensor:
    n, s = grid.n, grid.prefix
    m = torch.zeros(n, n, dtype=torch.bool)
    if kind == "full":
        m[:] = True
    elif kind == "special":
        m[:, :s] = True
        m[:s, :] = True   # special tokens themselves keep global attention (FastGen keeps them whole)
    elif kind == "local":
        ys, xs = _patch_coords(grid)
        r = int(p["radius"])
        m[s:, s:] = ((ys[:, None] - ys[None, :]).abs() <= r) & ((xs[:, None] - xs[None, :]).abs() <= r)
    elif kind == "strided":
        ys, xs = _patch_coords(grid)
        st = int(p["stride"])
        keep = (ys % st == 0) & (xs % st == 0)
        m[:, s:] = keep[None, :]
    elif kind == "heavy":
        m[:, torch.as_tensor(p["cols"], dtype=torch.long)] = True
    else:
        raise ValueError(f"unknown attention policy kind '{kind}'")
    m |= torch.eye(n, dtype=torch.bool)   # every token sees itself: no empty rows from a policy
    return m


def policy_token_mask(policy: dict[str, Any], grid: Grid) -> torch.Tensor:
    """(N, N) bool token mask of a (possibly composed) policy."""
    m = torch.zeros(grid.n, grid.n, dtype=torch.bool)
    for kind in policy["kind"].split("+"):
        m |= _one(kind, policy, grid)
    return m


def block_cover(token_mask: torch.Tensor, block: int) -> torch.Tensor:
    """(..., N, N) token mask -> (..., nb, nb) block mask: a block is on if any token in it is."""
    n = token_mask.shape[-1]
    nb = -(-n // block)
    m = token_mask.new_zeros(*token_mask.shape[:-2], nb * block, nb * block)
    m[..., :n, :n] = token_mask
    return m.reshape(*m.shape[:-2], nb, block, nb, block).any(-1).any(-2)


def expand_blocks(block_mask: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """(..., nb, nb) -> (..., N, N)."""
    return block_mask.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :n, :n]

