"""Token-reduction primitives made of gathers, top-k and small one-hot matmuls (no
scatter_reduce, which ONNX lacks and TensorRT gets wrong), so they export with dynamic batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ordered_topk", "merge_bipartite", "prune_by_score"]


def ordered_topk(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores along the last dim; ties go to the lower index in torch and
    onnxruntime alike (a tiny index penalty, since neither backend promises a stable top-k)."""
    n = score.shape[-1]
    penalty = torch.arange(n, device=score.device, dtype=score.dtype) * 1e-6  # [n]
    return torch.topk(score - penalty, k, dim=-1, sorted=True).indices


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, C], idx [B, K] -> [B, K, C]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def merge_bipartite(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int,
                    prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching: the r most similar alternate-set tokens merge into their
    best partner by size-weighted average. Prefix tokens (CLS, dist, registers) never merge.

    x [B, N, C], size [B, N, 1] (tokens represented), metric [B, N, D] (attention keys).
    Returns x [B, N - r, C] and size [B, N - r, 1]: prefix, unmerged set A, set B."""
    head_x, x = x[:, :prefix], x[:, prefix:]
    head_s, size = size[:, :prefix], size[:, prefix:]
    metric = F.normalize(metric[:, prefix:], dim=-1)
    a_m, b_m = metric[:, ::2], metric[:, 1::2]                         # [B, Na, D], [B, Nb, D]
    node_max, node_idx = (a_m @ b_m.transpose(-1, -2)).max(dim=-1)     # [B, Na]
    order = ordered_topk(node_max, node_max.shape[-1])                 # [B, Na] most similar first
    src_idx, unm_idx = order[:, :r], order[:, r:]                      # [B, r], [B, Na - r]
    dst_idx = torch.gather(node_idx, 1, src_idx)                       # [B, r] partner in B
    xs = x * size                                                      # sum of represented tokens
    a_x, b_x, a_s, b_s = xs[:, ::2], xs[:, 1::2], size[:, ::2], size[:, 1::2]
    nb = b_x.shape[1]
    onehot = (dst_idx.unsqueeze(-1) == torch.arange(nb, device=x.device)).to(x.dtype)  # [B, r, Nb]
    b_s = b_s + onehot.transpose(1, 2) @ torch.gather(a_s, 1, src_idx.unsqueeze(-1))  # [B, Nb, 1]
    b_x = b_x + onehot.transpose(1, 2) @ _gather(a_x, src_idx)                        # [B, Nb, C]
    unm_s = torch.gather(a_s, 1, unm_idx.unsqueeze(-1))
    out_s = torch.cat([head_s, unm_s, b_s], dim=1)
    out_x = torch.cat([head_x, _gather(a_x, unm_idx) / unm_s, b_x / b_s], dim=1)
    return out_x, out_s


def prune_by_score(x: torch.Tensor, score: torch.Tensor, keep: int, prefix: int) -> torch.Tensor:
    """EViT: keep the ``keep`` patch tokens with the highest CLS attention and fuse the rest into
    one token weighted by that attention. x [B, N, C], score [B, N - prefix] -> [B, prefix + keep + 1, C]."""
    head, rest = x[:, :prefix], x[:, prefix:]
    idx = ordered_topk(score, keep)                                                  # [B, keep]
    kept_mask = (idx.unsqueeze(-1) == torch.arange(rest.shape[1], device=x.device)).any(1)  # [B, N - p]
    w = (score * (~kept_mask).to(score.dtype)).unsqueeze(-1)                        # [B, N - p, 1]
    fused = (w * rest).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-12)  # [B, 1, C]
    return torch.cat([head, _gather(rest, idx), fused], dim=1)
