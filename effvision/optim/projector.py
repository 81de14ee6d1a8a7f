"""GaLore's gradient projector: which side to project, the SVD that finds the subspace, and
the projection itself. The projector tensors live in the optimizer state (``proj``, and
``proj_right`` for proj_type 'full'), so checkpoints stay plain tensors.

For a 2-D gradient G (m x n) and rank r (galore-torch 1.0's conventions):
  right: P = Vh[:r] (r x n),   R = G P^T (m x r),   back = N P
  left:  P = U[:, :r] (m x r), R = P^T G (r x n),   back = P N
  full:  L = U[:, :r], Q = Vh[:r],  R = L^T G Q^T (r x r),  back = L N Q
'std' picks right when m >= n (the smaller state), 'reverse_std' the opposite.
"""
from __future__ import annotations

import warnings
from typing import Literal

import torch

from ..errors import TrainingDiverged

__all__ = ["ProjType", "SvdMethod", "projection_side", "state_shape", "refresh_projector", "project"]

ProjType = Literal["std", "reverse_std", "left", "right", "full"]
SvdMethod = Literal["exact", "randomized"]
Side = Literal["left", "right", "full"]


def projection_side(proj_type: ProjType, m: int, n: int) -> Side:
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def state_shape(side: Side, m: int, n: int, rank: int) -> tuple[int, int]:
    """Shape of the projected gradient, hence of each moment."""
    return {"right": (m, rank), "left": (rank, n), "full": (rank, rank)}[side]


def _randomized_svd(g: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Halko et al.'s randomized SVD (rank + 8 sketch, 2 power iterations), GaLore 2's route to
    a cheap refresh. Hand-written rather than torch.svd_lowrank because that draws from the
    global RNG: under DDP every rank must draw the same sketch or their projectors (and
    weights) drift apart; here the sketch is seeded by the step."""
    m, n = g.shape
    q = min(rank + 8, m, n)
    gen = torch.Generator(device=g.device).manual_seed(seed)
    y = g @ torch.randn(n, q, generator=gen, device=g.device, dtype=g.dtype)   # (m, q)
    for _ in range(2):  # power iterations sharpen the spectrum; QR keeps them stable
        y = g @ (g.T @ torch.linalg.qr(y).Q)
    basis = torch.linalg.qr(y).Q                                              # (m, q)
    ub, _, vh = torch.linalg.svd(basis.T @ g, full_matrices=False)             # (q, n) is small
    return (basis @ ub)[:, :rank], vh[:rank]


def _svd(g: torch.Tensor, rank: int, method: SvdMethod, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U[:, :r], Vh[:r]) of the fp32 gradient."""
    if method == "randomized":
        return _randomized_svd(g, rank, seed)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    return u[:, :rank], vh[:rank]


def refresh_projector(state: dict, grad2d: torch.Tensor, rank: int, side: Side, method: SvdMethod) -> None:
    """Recompute the projector from ``grad2d`` (m x n) in fp32; on an SVD failure keep the
    previous one (the reference crashes), counting the failures in ``state['svd_failures']``."""
    try:
        u, vh = _svd(grad2d.float(), rank, method, seed=int(state.get("step", 0)))
        if not (torch.isfinite(u).all() and torch.isfinite(vh).all()):
            raise torch.linalg.LinAlgError("non-finite singular vectors")
    except (torch.linalg.LinAlgError, RuntimeError) as e:
        if "proj" not in state:
            raise TrainingDiverged(f"the SVD of a {tuple(grad2d.shape)} gradient failed before any projector "
                                   f"existed ({e}); is the gradient finite?") from e
        state["svd_failures"] = state.get("svd_failures", 0) + 1
        warnings.warn(f"GaLore: SVD of a {tuple(grad2d.shape)} gradient failed ({e}); keeping the previous projector",
                      RuntimeWarning, stacklevel=3)
        return
    dtype = grad2d.dtype  # the reference keeps the projector in the gradient's dtype
    if side == "right":
        state["proj"] = vh.to(dtype).contiguous()             # (r, n)
    elif side == "left":
        state["proj"] = u.to(dtype).contiguous()              # (m, r)
    else:
        state["proj"] = u.to(dtype).contiguous()              # (m, r)
        state["proj_right"] = vh.to(dtype).contiguous()       # (r, n)


def project(state: dict, grad2d: torch.Tensor, side: Side) -> torch.Tensor:
    p = state["proj"]
    if side == "right":
        return grad2d @ p.T                       # (m, n) @ (n, r) -> (m, r)
    if side == "left":
        return p.T @ grad2d                       # (r, m) @ (m, n) -> (r, n)
    return p.T @ grad2d @ state["proj_right"].T   # (r, m) @ (m, n) @ (n, r) -> (r, r)
