"""Contextual sparsity (Deja Vu, for ViTs): per block, a low-rank predictor reads the block input
of each image and picks the attention heads and MLP neurons worth computing; only those run.

Execution paths of a :class:`ContextualBlock` (``block.ctx_mode``):

- ``dense``: timm's Block, untouched.
- ``sparse``: the predictor's top-k, computed by gathering the chosen heads' qkv rows / proj
  columns and the chosen fc1 rows / fc2 columns (index_select + batched matmul; per image, so
  images of a batch may choose differently). The fast path.
- ``masked``: the same choice applied as masks on the dense computation: the reference the
  sparse path is tested against.
- ``oracle``: the top-k of the true importance (head: mean over tokens of the L2 norm of the
  head's contribution to the attention output; neuron: mean |activation| after GELU), masked.
- ``collect``: dense, and records (features, importance) per image for predictor training.

The predictors are ordinary submodules (``blocks.i.ctx_pred``), so their weights live in
model.safetensors; the model's record lists the ``contextual_sparsity`` mode, and ``load_model``
rebuilds it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block, VisionTransformer

from ..errors import ConfigError, EffVisionError

__all__ = ["ContextualConfig", "ContextualBlock", "BlockPredictor", "MODE", "attach_predictors_",
           "restore_contextual", "legacy_contextual", "set_contextual_mode_", "contextual_macs", "check_predictors_dir"]

MODE = "contextual_sparsity"

ExecMode = Literal["dense", "sparse", "masked", "oracle", "collect"]
EXEC_MODES = ("dense", "sparse", "masked", "oracle", "collect")


@dataclass
class ContextualConfig:
    """Contextual sparsity (Deja Vu, for ViTs): the fractions of attention heads and MLP neurons
    computed per image, and the low-rank predictors that choose them."""

    head_keep: float = 0.5          # fraction of attention heads computed per image, in (0, 1]
    mlp_keep: float = 0.3           # fraction of MLP hidden neurons computed per image, in (0, 1]
    rank: int = 128                 # predictor hidden width (Linear(D, rank) -> ReLU -> Linear(rank, out))
    steps: int = 1000               # predictor training steps (Adam, minibatches of the calibration set)
    lr: float = 1e-2
    predictors: str | None = None   # a model dir whose trained predictors to reuse instead of training

    def validate(self, where: str = "contextual_sparsity") -> None:
        for key in ("head_keep", "mlp_keep"):
            v = getattr(self, key)
            if not 0 < v <= 1:
                raise ConfigError(f"{where}.{key}: {v} is outside (0, 1]")
        if self.rank < 1:
            raise ConfigError(f"{where}.rank: {self.rank} must be >= 1")
        if self.steps < 1 or self.lr <= 0:
            raise ConfigError(f"{where}: steps must be >= 1 and lr > 0 (got {self.steps}, {self.lr})")


def keep_count(n: int, fraction: float) -> int:
    return max(1, int(fraction * n + 0.5))  # nearest count, at least one


class LowRank(nn.Sequential):
    def __init__(self, dim: int, rank: int, out: int) -> None:
        super().__init__(nn.Linear(dim, rank, bias=False), nn.ReLU(), nn.Linear(rank, out))


class BlockPredictor(nn.Module):
    """Scores heads from the mean normed block input and neurons from the mean normed MLP input."""

    def __init__(self, dim: int, rank: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = LowRank(dim, rank, heads)
        self.neurons = LowRank(dim, rank, hidden)


# --------------------------------------------------------------------------------------------- attention
def _qkv_heads(attn: Attention, h: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Per-head attention outputs before proj: (B, H', N, hd); H' = all heads (idx None) or the
    chosen ones, whose qkv rows alone are gathered and multiplied. h: (B, N, D); idx: (B, k)."""
    B, N, _ = h.shape
    hd, H = attn.head_dim, attn.num_heads
    if idx is None:
        qkv = attn.qkv(h).reshape(B, N, 3, H, hd)
        k = H
    else:
        k = idx.shape[1]
        rows = (torch.arange(3, device=h.device)[:, None, None] * (H * hd) + idx[:, None, :, None] * hd
                + torch.arange(hd, device=h.device)).reshape(B, -1)             # (B, 3 k hd)
        w = attn.qkv.weight.index_select(0, rows.reshape(-1)).view(B, -1, h.shape[-1])  # (B, 3 k hd, D)
        qkv = torch.bmm(h, w.transpose(1, 2))                                   # (B, N, 3 k hd)
        if attn.qkv.bias is not None:
            qkv = qkv + attn.qkv.bias[rows][:, None]
        qkv = qkv.view(B, N, 3, k, hd)
    q, kk, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                             # (B, k, N, hd) each
    q, kk = attn.q_norm(q), attn.k_norm(kk)                                     # per-head norms: any head count
    return F.scaled_dot_product_attention(q, kk, v)


def _proj_gather(attn: Attention, o: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """o: (B, k, N, hd) of the heads idx (B, k) -> (B, N, D) through their proj columns only."""
    B, k, N, hd = o.shape
    cols = (idx[:, :, None] * hd + torch.arange(hd, device=o.device)).reshape(-1)  # (B k hd,)
    w = attn.proj.weight.index_select(1, cols).view(-1, B, k * hd).permute(1, 2, 0)  # (B, k hd, D)
    out = torch.bmm(o.transpose(1, 2).reshape(B, N, k * hd), w)
    if attn.proj.bias is not None:
        out = out + attn.proj.bias
    return attn.proj_drop(out)


def _proj_masked(attn: Attention, o: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """o: (B, H, N, hd), mask: (B, H) -> (B, N, D), the unchosen heads zeroed before proj."""
    B, H, N, hd = o.shape
    o = o * mask[:, :, None, None].to(o.dtype)
    return attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(B, N, H * hd)))


def head_importance(attn: Attention, o: torch.Tensor) -> torch.Tensor:
    """(B, H, N, hd) -> (B, H): mean over tokens of the L2 norm of each head's proj contribution."""
    H, hd = o.shape[1], o.shape[3]
    w = attn.proj.weight.view(-1, H, hd)                                        # (D, H, hd)
    contrib = torch.einsum("bhnd,ehd->bhne", o, w)                              # (B, H, N, D)
    return contrib.norm(dim=-1).mean(-1)


# --------------------------------------------------------------------------------------------- MLP
def _mlp_gather(mlp: Mlp, m: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """m: (B, N, D), idx: (B, k) chosen hidden neurons -> (B, N, D) via their fc1 rows / fc2 columns."""
    B, _, D = m.shape
    flat = idx.reshape(-1)
    w1 = mlp.fc1.weight.index_select(0, flat).view(B, -1, D)                    # (B, k, D)
    a = torch.bmm(m, w1.transpose(1, 2))                                        # (B, N, k)
    if mlp.fc1.bias is not None:
        a = a + mlp.fc1.bias[idx][:, None]
    a = mlp.drop1(mlp.act(a))
    w2 = mlp.fc2.weight.index_select(1, flat).view(-1, B, idx.shape[1]).permute(1, 2, 0)  # (B, k, D)
    out = torch.bmm(a, w2)
    if mlp.fc2.bias is not None:
        out = out + mlp.fc2.bias
    return mlp.drop2(out)


def _mlp_masked(mlp: Mlp, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """a: (B, N, hidden) activations after GELU; mask (B, hidden) -> (B, N, D)."""
    return mlp.drop2(mlp.fc2(mlp.drop1(a) * mask[:, None].to(a.dtype)))


def _topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)


# --------------------------------------------------------------------------------------------- block
class ContextualBlock(Block):
    """A timm Block whose attention heads and MLP neurons are chosen per image (see module doc)."""

    ctx_mode: str = "sparse"
    head_k: int = 0
    mlp_k: int = 0
    ctx_pred: BlockPredictor

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,  # type: ignore[override]
                is_causal: bool = False) -> torch.Tensor:
        mode = self.ctx_mode
        if mode == "dense" or attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        h = self.norm1(x)                                                       # (B, N, D)
        if mode == "sparse":
            idx = self.ctx_pred.heads(h.mean(1)).topk(self.head_k, dim=1).indices  # (B, kh)
            y = _proj_gather(self.attn, _qkv_heads(self.attn, h, idx), idx)
        else:
            o = _qkv_heads(self.attn, h, None)                                  # (B, H, N, hd)
            if mode == "collect":
                self._records.append({"head_in": h.mean(1), "head_imp": head_importance(self.attn, o)})
                mask = torch.ones(o.shape[:2], dtype=torch.bool, device=o.device)  # (B, H)
            else:
                scores = head_importance(self.attn, o) if mode == "oracle" else self.ctx_pred.heads(h.mean(1))
                mask = _topk_mask(scores, self.head_k)
            y = _proj_masked(self.attn, o, mask)
        x = x + self.drop_path1(self.ls1(y))
        m = self.norm2(x)                                                       # (B, N, D)
        if mode == "sparse":
            idx = self.ctx_pred.neurons(m.mean(1)).topk(self.mlp_k, dim=1).indices  # (B, km)
            y = _mlp_gather(self.mlp, m, idx)
        else:
            a = self.mlp.act(self.mlp.fc1(m))                                   # (B, N, hidden)
            if mode == "collect":
                self._records[-1].update(mlp_in=m.mean(1), mlp_imp=a.abs().mean(1))
                mask = torch.ones(a.shape[0], a.shape[2], dtype=torch.bool, device=a.device)  # (B, hidden)
            else:
                scores = a.abs().mean(1) if mode == "oracle" else self.ctx_pred.neurons(m.mean(1))
                mask = _topk_mask(scores, self.mlp_k)
            y = _mlp_masked(self.mlp, a, mask)
        return x + self.drop_path2(self.ls2(y))


def _shape(model: nn.Module) -> dict[str, int]:
    """width, heads, MLP hidden and depth of a handled model (raises for other families)."""
    blocks = getattr(model, "blocks", None)
    ok = isinstance(model, VisionTransformer) and isinstance(blocks, nn.Sequential) and len(blocks) > 0
    for b in blocks if ok else []:
        ok = ok and type(b) in (Block, ContextualBlock) and type(b.attn) is Attention and type(b.mlp) is Mlp \
            and isinstance(b.attn.norm, nn.Identity) and getattr(b.attn, "gate", None) is None \
            and isinstance(b.mlp.fc1, nn.Linear) and isinstance(b.mlp.norm, nn.Identity)
    if not ok:
        inner = {type(b).__name__ for b in blocks} if isinstance(blocks, nn.Module) else set()
        raise EffVisionError(f"contextual sparsity has no handler for {type(model).__name__}"
                             f"{' with ' + '/'.join(sorted(inner)) if inner else ''} (timm VisionTransformer "
                             f"with plain Blocks, Attention and Mlp only)")
    b0 = blocks[0]
    return {"width": b0.attn.qkv.in_features, "heads": b0.attn.num_heads, "mlp_hidden": b0.mlp.fc1.out_features,
            "depth": len(blocks)}


def attach_predictors_(model: nn.Module, cfg: ContextualConfig) -> nn.Module:
    """Swap the blocks to ContextualBlock with fresh predictors (mode ``sparse``), in place."""
    cfg.validate()
    _shape(model)
    ref = model.patch_embed.proj.weight
    for blk in model.blocks:
        H, hidden = blk.attn.num_heads, blk.mlp.fc1.out_features  # per block: pruning may differ by block
        blk.__class__ = ContextualBlock
        blk.ctx_pred = BlockPredictor(blk.attn.qkv.in_features, cfg.rank, H, hidden).to(ref.device, ref.dtype)
        blk.head_k, blk.mlp_k = keep_count(H, cfg.head_keep), keep_count(hidden, cfg.mlp_keep)
        blk.ctx_mode, blk._records = "sparse", []
    return model


def set_contextual_mode_(model: nn.Module, mode: ExecMode) -> None:
    if mode not in EXEC_MODES:
        raise EffVisionError(f"contextual mode {mode!r} is not one of {', '.join(EXEC_MODES)}")
    for blk in model.blocks:
        blk.ctx_mode = mode


def check_predictors_dir(model: nn.Module, directory: str | Path, where: str = "contextual_sparsity.predictors"
                         ) -> dict[str, torch.Tensor]:
    """The predictor tensors of a model dir, checked against ``model``'s width/heads/MLP/depth
    (one-line error on any difference). Reads only the safetensors file."""
    from safetensors import safe_open

    from ..models.io import WEIGHTS_FILE

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise EffVisionError(f"{where}: {directory} is not a model dir (no {WEIGHTS_FILE})")
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if ".ctx_pred." in k}
    if not state:
        raise EffVisionError(f"{where}: {directory} holds no contextual-sparsity predictors")
    _shape(model)
    depth = 1 + max(int(k.split(".")[1]) for k in state)
    for i, blk in enumerate(model.blocks[:depth]):  # per block: a pruned model's heads/hidden may differ by block
        pre = f"blocks.{i}.ctx_pred."
        theirs = (state[pre + "heads.0.weight"].shape[1], state[pre + "heads.2.weight"].shape[0],
                  state[pre + "neurons.2.weight"].shape[0], depth)
        ours = (blk.attn.qkv.in_features, blk.attn.num_heads, blk.mlp.fc1.out_features, len(model.blocks))
        diff = [f"{k} {a} vs {b}" for k, a, b in zip(("width", "heads", "mlp_hidden", "depth"), theirs, ours) if a != b]
        if diff:
            raise EffVisionError(f"{where}: {directory} was trained for another model (block {i}: {', '.join(diff)}; "
                                 f"predictors vs this model)")
    return state


def restore_contextual(model: nn.Module, config: dict[str, Any], metadata: dict[str, Any]) -> None:
    """The ``contextual_sparsity`` mode's restore: fresh predictors of the recorded rank (their weights load next)."""
    attach_predictors_(model, ContextualConfig(head_keep=config["head_keep"], mlp_keep=config["mlp_keep"],
                                               rank=metadata.get("rank", config.get("rank", 128))))


def legacy_contextual(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A model spec's pre-record ``contextual_sparsity`` transform -> (config, metadata)."""
    return {"head_keep": params["head_keep"], "mlp_keep": params["mlp_keep"], "rank": params["rank"]}, \
        {"rank": params["rank"]}


def contextual_macs(model: nn.Module, tokens: int) -> dict[str, float]:
    """Multiply-accumulates per image in the blocks: dense, with the chosen heads/neurons, and the
    predictors' own (which the sparse figure includes)."""
    dense = sparse = pred = 0.0
    for blk in model.blocks:
        D, H, hd, hidden = blk.attn.qkv.in_features, blk.attn.num_heads, blk.attn.head_dim, blk.mlp.fc1.out_features
        attn = lambda h: tokens * D * 3 * h * hd + 2 * tokens * tokens * h * hd + tokens * h * hd * D  # noqa: E731
        dense += attn(H) + 2 * tokens * D * hidden
        if isinstance(blk, ContextualBlock):
            sparse += attn(blk.head_k) + 2 * tokens * D * blk.mlp_k
            pred += sum(p.numel() for n, p in blk.ctx_pred.named_parameters() if n.endswith("weight"))
        else:
            sparse += attn(H) + 2 * tokens * D * hidden
    return {"dense": dense, "sparse": sparse + pred, "predictors": pred, "fraction": (sparse + pred) / dense}
