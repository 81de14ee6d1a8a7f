"""Swap timm Attention modules to their block-sparse form in place (class swap, as
quantization does: same parameters, same state-dict keys, still a timm model)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention

from ..errors import EffVisionError
from .backends import BACKENDS, attend
from .export import BlockGatherAttention
from .policies import Grid, block_cover, policy_token_mask

__all__ = ["SparseAttention", "apply_policies", "model_grid", "density_report"]


class SparseAttention(Attention):
    """timm Attention whose heads attend only to their policy's kernel blocks."""

    def _setup(self, policies: list[dict[str, Any]], grid: Grid, block: int, backend: str = "auto") -> None:
        self.policies, self.grid, self.block, self.backend = policies, grid, block, backend
        masks = torch.stack([block_cover(policy_token_mask(p, grid), block) for p in policies])
        # not in the state dict: the policies (a transform in the model spec) define it
        self.register_buffer("block_mask", masks.to(self.qkv.weight.device), persistent=False)
        # what torch.export (ONNX) traces instead: block gather / masked dense, same outputs
        self.export_attn = BlockGatherAttention(masks, grid.n, block).to(self.qkv.weight.device)
        self._flex_masks: dict[str, Any] = {}

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        if attn_mask is not None or is_causal or n != self.grid.n:
            raise EffVisionError(f"sparse attention was profiled for {self.grid.n} tokens without masks; "
                                 f"got {n} tokens (mask={attn_mask is not None}, causal={is_causal})")
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                   # (B, H, N, D)
        q, k = self.q_norm(q), self.k_norm(k)
        if torch.compiler.is_exporting():
            x = self.export_attn(q, k, v, self.scale)
        else:
            x = attend(q, k, v, self.block_mask, self.block, self.scale, self.backend, self._flex_masks)
        x = x.transpose(1, 2).reshape(b, n, -1)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _vit(model: nn.Module) -> nn.Module:
    """The timm ViT itself, or the one inside an effvision detection backbone."""
    for m in model.modules():
        if hasattr(m, "patch_embed") and hasattr(m.patch_embed, "grid_size"):
            return m
    raise EffVisionError("sparse attention needs a ViT with a patch_embed grid")


def model_grid(model: nn.Module, input_hw: tuple[int, int] | None = None) -> Grid:
    """The token grid of a timm ViT (or of the ViT inside an effvision detection backbone) at
    its own image size, or at ``input_hw`` (a backbone with dynamic image size)."""
    vit = _vit(model)
    gh, gw = vit.patch_embed.grid_size
    if input_hw is not None:
        ph, pw = vit.patch_embed.patch_size
        gh, gw = input_hw[0] // ph, input_hw[1] // pw
    prefix = int(getattr(vit, "num_prefix_tokens", 0))
    return Grid(prefix=prefix, h=int(gh), w=int(gw))


def attention_modules(model: nn.Module) -> dict[str, Attention]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


def apply_policies(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Swap each named Attention to SparseAttention with its per-head policies. One-line error
    before any swap when a layer or the head count does not match."""
    mods = attention_modules(model)
    grid = Grid(**spec["grid"])
    backend = spec.get("backend", "auto")
    if backend not in BACKENDS:
        raise EffVisionError(f"attention policies name backend '{backend}' (known: {', '.join(BACKENDS)})")
    vit_grid = model_grid(model)
    if grid.prefix != vit_grid.prefix:
        raise EffVisionError(f"attention policies were profiled with {grid.prefix} special tokens; the model has "
                             f"{vit_grid.prefix}")
    # a fixed-size ViT runs one grid only; a dynamic-size one (detection) runs at the profiled size
    if not getattr(_vit(model), "dynamic_img_size", False) and (grid.h, grid.w) != (vit_grid.h, vit_grid.w):
        raise EffVisionError(f"attention policies were profiled on a {grid.h}x{grid.w} token grid; the model runs "
                             f"{vit_grid.h}x{vit_grid.w}")
    for name, heads in spec["layers"].items():
        if name not in mods:
            raise EffVisionError(f"attention policies name layer '{name}', which is not in the model")
        if len(heads) != mods[name].num_heads:
            raise EffVisionError(f"attention policies for '{name}' have {len(heads)} heads; the model has "
                                 f"{mods[name].num_heads}")
    for name, heads in spec["layers"].items():
        mod = mods[name]
        mod.__class__ = SparseAttention
        mod._setup([h["policy"] for h in heads], grid, int(spec["block"]), backend)
    return model


def density_report(spec: dict[str, Any]) -> dict[str, Any]:
    """Block density per layer and head, and overall."""
    layers = {n: [round(h["density"], 4) for h in heads] for n, heads in spec["layers"].items()}
    flat = [d for v in layers.values() for d in v]
    return {"per_head": layers, "mean_density": sum(flat) / max(1, len(flat))}
