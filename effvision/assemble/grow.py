"""Function-preserving growth of a timm VisionTransformer (progressive training, bert2BERT/LiGO).

- Depth: new blocks copy their neighbour's weights (a warm start for qkv/fc1) but their residual
  branches output zero (LayerScale gamma 0 where present, else attn.proj and mlp.fc2 zeroed),
  so the network computes the same function.
- Width x2 (Net2Net/bert2BERT): every residual-stream channel is duplicated, [x] -> [x, x]. A
  LayerNorm over [x, x] has the same mean and variance, so it stays exact with gamma/beta
  duplicated. Heads are duplicated (head_dim unchanged, so the attention scale and qk_norm
  stay), MLP hidden units too. A linear layer reading duplicated inputs gets its weight split
  column-wise with random factors r and 1-r (sums are unchanged; the random split breaks the
  symmetry between copies: their gradients differ). Other ratios would need masked LayerNorm,
  which is not a timm module, so they are refused.
- Optimizer state (``grow_optimizer_state``): the same maps applied to the per-parameter state,
  for a next train stage that continues with it (``optimizer_state: carry``).

The grown model is rebuilt with ``timm.create_model`` from the spec with new kwargs (depth,
embed_dim, num_heads), so it stays a plain timm model saved as spec + safetensors, with the
stochastic-depth schedule of its new depth; its record notes the ``grow`` mode.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from ..errors import ConfigError, EffVisionError
from ..models.io import ModelSpec, create_model
from ..models.modes import add_mode, check_next, record_of

__all__ = ["GrowConfig", "MODE", "grow_model", "restore_grown", "grow_optimizer_state", "model_shape"]

MODE = "grow"

Tensor = torch.Tensor
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


@dataclass
class GrowConfig:
    """Function-preserving growth of a timm VisionTransformer: the target depth, the width factor,
    and where new blocks go."""

    depth: int = 0                                      # target number of blocks; 0 keeps the depth
    width: int = 1                                      # width factor: 1 (keep) or 2 (embed, heads, MLP x2)
    position: Literal["interleave", "end"] = "interleave"  # where new blocks go
    seed: int = 0                                       # the random split factors of width growth

    def validate(self, where: str) -> None:
        if self.depth < 0:
            raise ConfigError(f"{where}.depth: {self.depth} < 0 (the target number of blocks; 0 keeps the depth)")
        if self.width not in (1, 2):
            raise ConfigError(f"{where}.width: {self.width} is not supported; width growth is exact only for x2 "
                              f"(other ratios need masked LayerNorm)")


def model_shape(model: nn.Module) -> tuple[int, int, int]:
    """(depth, embed_dim, num_heads) of a timm VisionTransformer."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not hasattr(model, "embed_dim") or len(blocks) == 0:
        raise EffVisionError(f"growth needs a timm VisionTransformer (blocks, embed_dim); got {type(model).__name__}")
    return len(blocks), int(model.embed_dim), int(blocks[0].attn.num_heads)


def check_growth(depth: int, cfg: GrowConfig, where: str = "grow") -> int:
    """The target depth; a target below the current depth (a shrink) is an error."""
    target = cfg.depth or depth
    if target < depth:
        raise EffVisionError(f"{where}.depth: {target} would shrink the model from {depth} blocks; growth only adds blocks")
    return target


@torch.no_grad()
def grow_model(model: nn.Module, spec: ModelSpec, cfg: GrowConfig) -> tuple[nn.Module, ModelSpec]:
    """A new timm model (and its spec) computing the same function as ``model``, grown per ``cfg``.
    The grown model's record is ``model``'s plus a ``grow`` entry (growth comes before other modes)."""
    record = record_of(model)
    check_next(record, MODE)
    depth, dim, heads = model_shape(model)
    target = check_growth(depth, cfg)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    if target > depth:
        state = _grow_depth(state, depth, target, cfg.position, layer_scale=_has_layer_scale(model))
    if cfg.width == 2:
        state = {k: _widen(k, v, dim, heads, lambda w: _split_in(w, gen)) for k, v in state.items()}
    kwargs = dict(spec.kwargs, depth=target, embed_dim=dim * cfg.width, num_heads=heads * cfg.width)
    new_spec = dataclasses.replace(spec, kwargs=kwargs, modes=record)
    grown = create_model(new_spec)
    grown.load_state_dict(state, strict=True)
    add_mode(grown, MODE, cfg, {"from": {"depth": depth, "embed_dim": dim, "num_heads": heads}})
    new_spec.modes = record_of(grown)
    return grown.to(next(model.parameters()).device).train(model.training), new_spec


def restore_grown(model: nn.Module, config: dict[str, Any], metadata: dict[str, Any]) -> None:
    """The ``grow`` mode's restore: nothing to do, the spec's kwargs are the grown architecture
    (the entry records where it came from; its rule keeps growth before every other mode)."""


def grow_optimizer_state(state: dict[str, dict[str, Tensor]], model: nn.Module,
                         cfg: GrowConfig) -> dict[str, dict[str, Tensor]]:
    """Per-parameter optimizer state (``{param name: {"exp_avg": ..., "step": ...}}``) of ``model``
    mapped onto the model ``grow_model(model, spec, cfg)`` returns.

    Depth: old blocks keep their state under their new index; inserted blocks get none (a fresh
    state: zero moments and step 0, so Adam's bias correction treats them as new). Width x2:
    tensors shaped like their parameter (Adam's moments, SGD's momentum) are expanded with the
    weight's index map, duplicated where the weight is duplicated or split, without the split
    factors: Adam's step m / sqrt(v) does not depend on the gradient's scale, so each copy
    continues the step its unit was taking, and the split factors make the copies' gradients
    diverge from there. Scalars (``step``) are kept. Other state (GaLore's projections) is refused.
    """
    depth, dim, heads = model_shape(model)
    target = check_growth(depth, cfg)
    shapes = {k: p.shape for k, p in model.named_parameters()}
    for name, s in state.items():
        for key, v in s.items():
            if name not in shapes or (v.dim() and v.shape != shapes[name]):
                raise EffVisionError(f"optimizer_state: carry cannot map state '{key}' {tuple(v.shape)} of '{name}' "
                                     f"(only per-parameter moments shaped like their parameter, and scalars)")
    out = dict(state)
    if target > depth:
        new_index = {i: j for j, (i, inserted) in enumerate(_depth_plan(depth, target, cfg.position)) if not inserted}
        out = {}
        for name, s in state.items():
            m = _BLOCK.match(name)
            out[f"blocks.{new_index[int(m.group(1))]}.{m.group(2)}" if m else name] = s
    if cfg.width == 2:
        out = {name: {key: _widen(name, v, dim, heads, _repeat_in) if v.dim() else v for key, v in s.items()}
               for name, s in out.items()}
    return out


def _has_layer_scale(model: nn.Module) -> bool:
    return hasattr(model.blocks[0].ls1, "gamma")


def _depth_plan(depth: int, target: int, position: str) -> list[tuple[int, bool]]:
    """Per new block: (the old block it copies, whether it is an inserted block)."""
    if position == "end":
        return [(i, False) for i in range(depth)] + [(depth - 1, True)] * (target - depth)
    # interleave: spread the new blocks evenly; after old block i go the inserts assigned to it
    extra = [(target - depth) * (i + 1) // depth - (target - depth) * i // depth for i in range(depth)]
    return [(i, j > 0) for i, n in enumerate(extra) for j in range(1 + n)]


def _grow_depth(state: dict[str, Tensor], depth: int, target: int, position: str, layer_scale: bool) -> dict[str, Tensor]:
    """Renumber blocks; each new block copies the block before it with a zero residual output."""
    blocks: dict[int, dict[str, Tensor]] = {}
    out = {}
    for key, value in state.items():
        m = _BLOCK.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            out[key] = value
    for j, (i, inserted) in enumerate(_depth_plan(depth, target, position)):
        for name, value in blocks[i].items():
            value = value.clone()
            if inserted and _zeroes_branch(name, layer_scale):
                value.zero_()
            out[f"blocks.{j}.{name}"] = value
    return out


def _zeroes_branch(name: str, layer_scale: bool) -> bool:
    if layer_scale:
        return name in ("ls1.gamma", "ls2.gamma")
    return name in ("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def _split_in(w: Tensor, gen: torch.Generator) -> Tensor:
    """[out, in] -> [out, 2*in]: columns split r / 1-r, so W' [x, x] = W x."""
    r = torch.rand(w.shape, generator=gen, dtype=torch.float64).to(w.dtype)
    return torch.cat([w * r, w * (1 - r)], dim=1)


def _repeat_in(w: Tensor) -> Tensor:
    """[out, in] -> [out, 2*in], columns repeated (optimizer moments of split weights)."""
    return torch.cat([w, w], dim=1)


def _widen(key: str, v: Tensor, dim: int, heads: int, split: Callable[[Tensor], Tensor]) -> Tensor:
    """The x2 version of one state-dict tensor (residual stream [x] -> [x, x]); ``split`` maps a
    weight reading the duplicated stream, [out, in] -> [out, 2*in]."""
    if key.startswith("patch_embed.backbone."):   # conv tokenizer: before the embedding width
        return v
    if key.startswith("patch_embed.proj."):        # conv producing the residual stream: duplicate outputs
        return torch.cat([v, v], dim=0)
    if key in ("cls_token", "reg_token", "pos_embed"):
        return torch.cat([v, v], dim=-1)
    if re.search(r"(^|\.)(norm|norm1|norm2|fc_norm|ls1|ls2)\.(weight|bias|gamma)$", key) and v.dim() == 1:
        return torch.cat([v, v], dim=0)           # LayerNorm / LayerScale over duplicated channels
    if re.search(r"\.attn\.(q_norm|k_norm)\.", key):
        return v                                  # per head_dim, which is unchanged
    if key.endswith("attn.qkv.weight"):           # [3*H*hd, D] -> [3*2H*hd, 2D], heads duplicated
        w = split(v).reshape(3, heads, -1, 2 * dim)
        return torch.cat([w, w], dim=1).reshape(-1, 2 * dim)
    if key.endswith("attn.qkv.bias"):
        b = v.reshape(3, heads, -1)
        return torch.cat([b, b], dim=1).reshape(-1)
    if re.search(r"\.(attn\.proj|mlp\.fc1|mlp\.fc2)\.weight$", key):
        # input duplicated (heads / hidden / stream) -> split columns; output duplicated -> copy rows,
        # each copy with its own split so copies get different gradients
        return torch.cat([split(v), split(v)], dim=0)
    if re.search(r"\.(attn\.proj|mlp\.fc1|mlp\.fc2)\.bias$", key):
        return torch.cat([v, v], dim=0)
    if key == "head.weight":
        return split(v)
    if key == "head.bias":
        return v
    raise EffVisionError(f"width growth does not know how to grow '{key}' {tuple(v.shape)} "
                         f"(supported: timm VisionTransformer with fused qkv)")
