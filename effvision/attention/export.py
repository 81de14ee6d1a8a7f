"""The export form of block-sparse attention: plain tensor ops that onnxruntime runs fast.

Per head, one of two exact forms of the same block mask:
- block gather: each query block attends to a padded list of its active key blocks (Gather +
  MatMul over K*block keys instead of N). A 2-D local window's block cover is a band, so this
  is banded windowed attention; a special-token head needs about two blocks per query block.
  Query blocks that attend to most blocks (the CLS row of special+local) run dense, apart.
- masked dense: SDPA with the token mask (heavy hitters and strided grids spread their columns
  over most blocks, so a gather would not be cheaper).
A head gathers when its gathered keys are at most ``GATHER_MAX_COST`` of dense attention's.
Both forms compute over exactly the keys of the block mask, so the exported graph matches the
eager module (the export's parity check holds it to 1e-4)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.block_sparse_attention import token_mask

__all__ = ["BlockGatherAttention", "GATHER_MAX_COST", "export_summary"]

GATHER_MAX_COST = 0.5   # gathered (query block, key block) pairs / dense pairs at most this


class BlockGatherAttention(nn.Module):
    """Attention of (B, H, N, D) q/k/v over a fixed (H, nb, nb) block mask, in the export form."""

    def __init__(self, block_mask: torch.Tensor, n: int, block: int, max_cost: float = GATHER_MAX_COST) -> None:
        super().__init__()
        bm = block_mask.detach().cpu().bool()
        h, nb, _ = bm.shape
        self.n, self.block, self.nb = n, block, nb
        cnt = bm.sum(-1)                                                   # (H, nb) key blocks per query block
        dense_row = cnt > nb // 2
        gather = []
        for i in range(h):
            k_h = int(cnt[i][~dense_row[i]].max()) if (~dense_row[i]).any() else 0
            cost = (nb - int(dense_row[i].sum())) * k_h + int(dense_row[i].sum()) * nb
            gather.append(nb > 1 and cost <= max_cost * nb * nb)
        g_idx = [i for i in range(h) if gather[i]]
        d_idx = [i for i in range(h) if not gather[i]]
        self.gathered = gather                                             # per head, for the manifest
        self.heads_g, self.heads_d = len(g_idx), len(d_idx)
        buf = lambda name, t: self.register_buffer(name, t, persistent=False)  # noqa: E731
        # additive float masks: onnxruntime adds them to the scores (no Where per call)
        fmask = lambda m: torch.zeros(m.shape).masked_fill(~m, float("-inf"))  # noqa: E731
        buf("g_idx", torch.tensor(g_idx, dtype=torch.long))
        buf("d_idx", torch.tensor(d_idx, dtype=torch.long))
        buf("head_inv", torch.argsort(torch.tensor(g_idx + d_idx, dtype=torch.long)))
        if d_idx:                                                          # masked dense heads
            # the (Hd, N, N) mask is expanded in forward from the block mask: an N x N buffer per
            # head would sit in memory for the eager model's whole life (0.4 GB a layer, 6 heads at N 4,097)
            buf("d_block", bm[d_idx])                                      # (Hd, nb, nb)
            buf("d_empty", ~token_mask(bm[d_idx], n, block).any(-1, keepdim=True))  # (Hd, N, 1)
        if g_idx:
            bg = bm[g_idx]                                                 # (Hg, nb, nb)
            rows_d = dense_row[g_idx].any(0)                               # union over the gathered heads
            s_rows = (~rows_d).nonzero().flatten()
            d_rows = rows_d.nonzero().flatten()
            self.ns, self.nd = len(s_rows), len(d_rows)
            buf("s_rows", s_rows)
            buf("d_rows", d_rows)
            buf("row_inv", torch.argsort(torch.cat([s_rows, d_rows])))
            tok_ok = torch.arange(nb * block) < n                          # padded key tokens are never keys
            if self.ns:
                sub = bg[:, s_rows]                                        # (Hg, S, nb)
                kmax = max(1, int(sub.sum(-1).max()))
                order = torch.argsort((~sub).to(torch.int8), dim=-1, stable=True)[..., :kmax]  # active first
                slot_ok = torch.gather(sub, -1, order)                     # (Hg, S, K)
                self.kmax = kmax
                # index into k reshaped (B, Hg * nb, block, D): head g's block j is row g * nb + j
                buf("k_idx", (order + torch.arange(len(g_idx))[:, None, None] * nb).flatten())
                tok = tok_ok.reshape(nb, block)[order]                     # (Hg, S, K, block)
                km = (slot_ok[..., None] & tok).reshape(len(g_idx) * self.ns, 1, kmax * block)
                empty = ~km.any(-1, keepdim=True)                          # (Hg*S, 1, 1)
                buf("s_mask", fmask(km | empty))
                buf("s_empty", empty)
            if self.nd:
                tm = token_mask(bg, nb * block, block)[:, :, :n]           # (Hg, nb*block, N) padded query rows
                tm = tm.reshape(len(g_idx), nb, block, n)[:, d_rows].reshape(len(g_idx), -1, n)
                buf("dr_mask", fmask(tm | ~tm.any(-1, keepdim=True)))
                buf("dr_empty", ~tm.any(-1, keepdim=True))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        outs = []
        if self.heads_g:
            outs.append(self._gathered(q.index_select(1, self.g_idx), k.index_select(1, self.g_idx),
                                       v.index_select(1, self.g_idx), scale))
        if self.heads_d:
            tm = token_mask(self.d_block, self.n, self.block) | self.d_empty  # empty rows: dummy, zeroed after
            add = torch.zeros(tm.shape, dtype=q.dtype, device=q.device).masked_fill(~tm, float("-inf"))
            o = F.scaled_dot_product_attention(q.index_select(1, self.d_idx), k.index_select(1, self.d_idx),
                                               v.index_select(1, self.d_idx), attn_mask=add, scale=scale)
            outs.append(o.masked_fill(self.d_empty, 0.0))
        out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        return out.index_select(1, self.head_inv) if self.heads_g and self.heads_d else out

    def _gathered(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        b, hg, n, d = q.shape                                              # (B, Hg, N, D)
        nb, blk = self.nb, self.block
        pad = nb * blk - n
        qb = F.pad(q, (0, 0, 0, pad)).reshape(b, hg, nb, blk, d)
        parts = []
        if self.ns:
            qs = qb.index_select(2, self.s_rows).reshape(b, hg * self.ns, blk, d)           # (B, Hg*S, blk, D)
            kf = F.pad(k, (0, 0, 0, pad)).reshape(b, hg * nb, blk, d)
            vf = F.pad(v, (0, 0, 0, pad)).reshape(b, hg * nb, blk, d)
            ks = kf.index_select(1, self.k_idx).reshape(b, hg * self.ns, self.kmax * blk, d)  # (B, Hg*S, K*blk, D)
            vs = vf.index_select(1, self.k_idx).reshape(b, hg * self.ns, self.kmax * blk, d)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=self.s_mask, scale=scale)
            parts.append(o.masked_fill(self.s_empty, 0.0).reshape(b, hg, self.ns, blk, d))
        if self.nd:
            qd = qb.index_select(2, self.d_rows).reshape(b, hg, self.nd * blk, d)
            o = F.scaled_dot_product_attention(qd, k, v, attn_mask=self.dr_mask, scale=scale)
            parts.append(o.masked_fill(self.dr_empty, 0.0).reshape(b, hg, self.nd, blk, d))
        out = torch.cat(parts, 2).index_select(2, self.row_inv) if len(parts) > 1 else parts[0]
        return out.reshape(b, hg, nb * blk, d)[:, :, :n]


def export_summary(model: nn.Module) -> dict[str, Any] | None:
    """Per policy kind: heads, how many export as block gather, and whether the cost rule
    (``GATHER_MAX_COST``) expects the sparse speedup to carry to onnxruntime: yes (all gathered),
    partly, or no (masked dense). An expectation from the export form, not a measurement."""
    kinds: dict[str, list[int]] = {}
    for m in model.modules():
        plan = getattr(m, "export_attn", None)
        if not isinstance(plan, BlockGatherAttention):
            continue
        for pol, g in zip(m.policies, plan.gathered):
            c = kinds.setdefault(pol["kind"], [0, 0])
            c[0] += 1
            c[1] += int(g)
    if not kinds:
        return None
    out: dict[str, Any] = {}
    for kind, (heads, g) in sorted(kinds.items()):
        carries = "yes" if g == heads else "no" if g == 0 else f"partly ({g} of {heads} heads)"
        out[kind] = {"heads": heads, "block_gather_heads": g, "expected_onnxruntime_speedup": carries}
    return {"export": "block gather (banded windowed attention) where it is at most "
                      f"{GATHER_MAX_COST:g} of dense attention's cost, masked dense attention otherwise; "
                      "same outputs as the eager module (parity checked)",
            "kinds": out}
