"""``reduce_tokens_``: ToMe or EViT on a timm VisionTransformer, in place, by swapping classes
(the model's and its blocks'), so state-dict keys and the timm API stay as they were; the
``reduce_tokens`` mode of the model's record."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ..errors import ConfigError, EffVisionError
from ..models.modes import add_mode, check_next, record_of
from .tokens import merge_bipartite, prune_by_score

MODE = "reduce_tokens"

__all__ = ["TokenReduceConfig", "MODE", "reduce_tokens_", "convert_reduced", "restore_reduced", "token_counts",
           "set_keep_rate_"]


@dataclass
class TokenReduceConfig:
    """Token reduction on a timm VisionTransformer: ToMe token merging or EViT token pruning. The
    ``reduce_tokens`` stage's config is this one plus its ``type``."""

    method: Literal["tome", "evit"] = "tome"
    r: int = 8                                        # ToMe: tokens merged per block
    schedule: Literal["constant", "decreasing"] = "constant"  # decreasing: 2r..0, same total
    prop_attn: bool = True                            # ToMe: log-size bias on attention logits
    keep_rate: float = 0.7                            # EViT: fraction of patch tokens kept per pruning block
    evit_blocks: list[int] = field(default_factory=list)  # EViT: pruning blocks; [] = depth/4, depth/2, 3depth/4

    def validate(self, where: str = "reduce_tokens") -> None:
        if self.r < 0:
            raise ConfigError(f"{where}.r: {self.r} must be >= 0")
        if not 0 < self.keep_rate <= 1:
            raise ConfigError(f"{where}.keep_rate: {self.keep_rate} is outside (0, 1]")


def _attend(attn: Attention, x: torch.Tensor, bias: torch.Tensor | None, cls_row: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """timm Attention's computation on fused SDPA with an additive bias; also returns the keys
    (mean over heads, ToMe's metric) and optionally the CLS query's attention row (EViT), computed
    on its own so the full N x N matrix is never materialised."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)                                   # [B, H, N, hd]
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    row = None
    if cls_row:
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-1, -2)  # [B, H, 1, N]
        if bias is not None:
            logits = logits + bias
        row = logits.softmax(-1).mean(1)[:, 0]                # [B, N]
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), k.mean(1), row


class ReduceBlock(Block):
    """A timm Block that carries token sizes and reduces tokens after its attention."""

    tome_r: int = 0
    evit_keep: int = 0      # > 0: keep this many patch tokens (plus one fused token)
    prop_attn: bool = True
    prefix: int = 1

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # type: ignore[override]
        bias = None
        if self.prop_attn and size is not None:
            bias = size.log().transpose(1, 2).unsqueeze(1).to(x.dtype)  # [B, 1, 1, N]
        y, keys, row = _attend(self.attn, self.norm1(x), bias, cls_row=self.evit_keep > 0)
        x = x + self.drop_path1(self.ls1(y))
        if self.tome_r:
            if size is None:
                size = torch.ones_like(x[..., :1])
            x, size = merge_bipartite(x, size, keys, self.tome_r, self.prefix)
        if self.evit_keep:
            x = prune_by_score(x, row[:, self.prefix:], self.evit_keep, self.prefix)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size


class ReduceMixin:
    """Model-level half: runs the blocks with sizes and pools averages by size."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self._features(x)[0]

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        size = None
        for blk in self.blocks:
            x, size = blk(x, size)
        return self.norm(x), size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x, size = self._features(x)
        if self.global_pool == "avg" and size is not None and self.attn_pool is None:
            p = self.num_prefix_tokens
            s = size[:, p:]
            x = (x[:, p:] * s).sum(1) / s.sum(1)             # size-weighted mean = mean over the original patches
            return self.head(self.head_drop(self.fc_norm(x)))
        return self.forward_head(x)


def _check_family(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer) or any(type(b) not in (Block, ReduceBlock) for b in model.blocks) \
            or any(type(b.attn) is not Attention for b in model.blocks):
        fam = type(model).__name__
        blocks = {type(b).__name__ for b in getattr(model, "blocks", [])}
        raise EffVisionError(f"token reduction has no handler for {fam}"
                             f"{' with ' + '/'.join(sorted(blocks)) if blocks else ''} (timm VisionTransformer with plain Blocks only)")


def token_counts(model: nn.Module, cfg: TokenReduceConfig) -> list[int]:
    """Tokens entering each block and after the last one; raises (before any change) if a
    schedule would leave fewer tokens than it needs."""
    _check_family(model)
    p, depth = model.num_prefix_tokens, len(model.blocks)
    n = model.patch_embed.num_patches + p
    counts = [n]
    if cfg.method == "evit":
        if p < 1 or not model.has_class_token:
            raise EffVisionError(f"EViT needs a CLS token; {type(model).__name__} "
                                 f"(global_pool={model.global_pool!r}) has none (use method: tome)")
        at = set(_evit_blocks(cfg, depth))
        for i in range(depth):
            if i in at:
                n = p + _evit_keep(n - p, cfg.keep_rate) + 1
            counts.append(n)
        return counts
    for i, r in enumerate(_schedule(cfg, depth)):
        a = (n - p + 1) // 2                               # set A size: the most that can merge
        if r > a:
            raise ConfigError(f"reduce_tokens.r: block {i} would merge {r} tokens but has {n - p} patch tokens "
                              f"({p} prefix), so at most {a} can merge (lower r)")
        n -= r
        counts.append(n)
    return counts


def _schedule(cfg: TokenReduceConfig, depth: int) -> list[int]:
    if cfg.schedule == "constant" or depth == 1:
        return [cfg.r] * depth
    return [round(2 * cfg.r * (depth - 1 - i) / (depth - 1)) for i in range(depth)]


def _evit_blocks(cfg: TokenReduceConfig, depth: int) -> list[int]:
    blocks = cfg.evit_blocks or sorted({max(1, depth * q // 4) for q in (1, 2, 3)} - {depth})
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ConfigError(f"reduce_tokens.evit_blocks: {bad} not in 0..{depth - 1}")
    return blocks


def _evit_keep(patches: int, rate: float) -> int:
    return max(1, math.ceil(rate * (patches - 1)))       # the fused token replaces one slot


def reduce_tokens_(model: nn.Module, cfg: TokenReduceConfig) -> list[int]:
    """Make ``model`` merge (ToMe) or prune (EViT) tokens; returns the token count per block.
    The model's record gains a ``reduce_tokens`` entry."""
    check_next(record_of(model), MODE)
    counts = _reduce(model, cfg)
    add_mode(model, MODE, cfg, {"tokens_per_block": counts})
    return counts


def convert_reduced(model: nn.Module, cfg: TokenReduceConfig, calib: list[torch.Tensor] | None) -> dict[str, Any]:
    """The ``reduce_tokens`` mode's verb in the mode signature (training-free: no data)."""
    return {"tokens_per_block": reduce_tokens_(model, cfg), "method": cfg.method}


def restore_reduced(model: nn.Module, config: dict[str, Any], metadata: dict[str, Any]) -> None:
    """The ``reduce_tokens`` mode's restore (class swaps only: no weights of its own)."""
    _reduce(model, TokenReduceConfig(**config))


def _reduce(model: nn.Module, cfg: TokenReduceConfig) -> list[int]:
    cfg.validate()
    counts = token_counts(model, cfg)                    # all checks before the first change
    depth, p = len(model.blocks), model.num_prefix_tokens
    rs = _schedule(cfg, depth) if cfg.method == "tome" else [0] * depth
    evit = set(_evit_blocks(cfg, depth)) if cfg.method == "evit" else set()
    for i, blk in enumerate(model.blocks):
        blk.__class__ = ReduceBlock
        blk.tome_r, blk.prop_attn, blk.prefix = rs[i], cfg.prop_attn and cfg.method == "tome", p
        blk.evit_keep = counts[i + 1] - p - 1 if i in evit else 0
    if not isinstance(model, ReduceMixin):
        cls = type(model)
        model.__class__ = type(f"Reduced{cls.__name__}", (ReduceMixin, cls), {})
    return counts


def set_keep_rate_(model: nn.Module, cfg: TokenReduceConfig) -> None:
    """Change an EViT model's kept tokens per pruning block to ``cfg.keep_rate`` (the keep-rate
    schedule of fine-tuning); the pruning blocks stay those of ``cfg``."""
    counts, p = token_counts(model, cfg), model.num_prefix_tokens
    for i in _evit_blocks(cfg, len(model.blocks)):
        model.blocks[i].evit_keep = counts[i + 1] - p - 1

