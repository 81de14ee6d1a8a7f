"""random-LTD (DeepSpeed Data Efficiency): chosen transformer blocks each process a random
subset of the patch tokens; the others pass through the block unchanged.

The transform swaps each chosen block's class for a subclass (as quantization does), so the
state-dict keys, the weights and the timm model stay as they are; ``remove_token_drop``
swaps them back. Prefix tokens (CLS, distillation, registers) are always kept. The kept
subset is a function of (seed, step, layer, rank): nothing enters the RNG state, so a
resumed run draws the same subsets, and DDP ranks draw different but reproducible ones.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..engine.hooks import Hooks
from ..errors import ConfigError
from .config import TokenDropConfig

__all__ = ["apply_token_drop", "check_token_drop", "kept_tokens", "layer_token_clock", "layer_tokens", "remove_token_drop",
           "token_counts"]


@dataclass
class _DropState:
    """Shared by the swapped blocks; set before every training step by the step hook."""
    seed: int
    rank: int
    keep: int                              # patch tokens kept this step
    step: int = 0
    layer_ids: dict[int, int] = field(default_factory=dict)  # id(block) -> block index


def kept_tokens(cfg: TokenDropConfig, num_patches: int, step: int, total_steps: int) -> int:
    """MSLG: from start_tokens to all, monotonic, in ``buckets`` equal increments."""
    horizon = cfg.schedule_steps or max(total_steps // 2, 1)
    if step >= horizon or cfg.buckets == 1 or cfg.start_tokens >= num_patches:
        return num_patches
    inc = math.ceil((num_patches - cfg.start_tokens) / (cfg.buckets - 1))
    level = step * (cfg.buckets - 1) // horizon  # 0 .. buckets-2 before the horizon
    return min(num_patches, cfg.start_tokens + level * inc)


def token_counts(cfg: TokenDropConfig, num_patches: int) -> list[int]:
    """Every count ``kept_tokens`` can return: the compiled shapes are bounded by ``buckets``."""
    if cfg.buckets == 1 or cfg.start_tokens >= num_patches:
        return [num_patches]
    inc = math.ceil((num_patches - cfg.start_tokens) / (cfg.buckets - 1))
    return sorted({min(num_patches, cfg.start_tokens + level * inc) for level in range(cfg.buckets - 1)}
                  | {num_patches})


@torch.compiler.disable  # host-side hashing and a CPU generator: kept out of compiled graphs
def _subset(state: _DropState, layer: int, batch: int, num_patches: int, device: torch.device) -> torch.Tensor:
    """(B, keep) sorted patch indices, without replacement, per sample, from (seed, step, layer, rank)."""
    key = f"{state.seed}/{state.step}/{layer}/{state.rank}".encode()
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    # On the CPU generator so the draw is identical on every device; the indices are small.
    idx = torch.rand(batch, num_patches, generator=g).argsort(dim=1)[:, :state.keep]
    return idx.sort(dim=1).values.to(device)


class _TokenDropMixin:
    """Forward of a block that sees only the kept tokens. Plain gather/scatter: autograd
    differentiates both (the scatter writes the block's outputs over a copy of its input, so
    dropped tokens are the identity forward and backward)."""

    _ltd: _DropState

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # x: (B, N, C)
        state = self._ltd
        prefix = int(getattr(self, "_ltd_prefix", 0))
        num_patches = x.shape[1] - prefix
        if not self.training or state.keep >= num_patches or args or kwargs:
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        idx = _subset(state, state.layer_ids[id(self)], x.shape[0], num_patches, x.device) + prefix  # (B, k)
        return self.forward_subset(x, idx)

    def forward_subset(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C); idx: (B, k) patch positions (prefix offset included) to process."""
        prefix = int(getattr(self, "_ltd_prefix", 0))
        gather_idx = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])           # (B, k, C)
        kept = torch.cat([x[:, :prefix], x.gather(1, gather_idx)], dim=1)  # (B, P+k, C)
        y = super().forward(kept)  # type: ignore[misc]                      # (B, P+k, C)
        out = x.scatter(1, gather_idx, y[:, prefix:])                         # (B, N, C)
        return torch.cat([y[:, :prefix], out[:, prefix:]], dim=1)


_SUBCLASSES: dict[type, type] = {}


def _drop_class(cls: type) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"TokenDrop{cls.__name__}", (_TokenDropMixin, cls), {})
    return _SUBCLASSES[cls]


def _blocks(model: nn.Module, where: str = "token_drop") -> nn.ModuleList | nn.Sequential:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0 \
            or getattr(model, "patch_embed", None) is None:
        raise ConfigError(f"{where}: {type(model).__name__} has no transformer blocks (model.blocks of a "
                          f"timm ViT); random-LTD needs a ViT-like model")
    return blocks


def _num_patches(model: nn.Module) -> int:
    return int(model.patch_embed.num_patches)  # type: ignore[union-attr]


def _layers(cfg: TokenDropConfig, depth: int, where: str) -> list[int]:
    layers = cfg.layers if cfg.layers is not None else list(range(1, depth - 1))
    for i in layers:
        if not 0 <= i < depth:
            raise ConfigError(f"{where}.layers: block index {i} is out of range (the model has {depth} blocks)")
    if not layers:
        raise ConfigError(f"{where}.layers: no block to drop tokens in (the model has {depth} blocks)")
    return sorted(set(layers))


def check_token_drop(model: nn.Module, cfg: TokenDropConfig, where: str = "token_drop") -> None:
    """Every model-dependent error, before any training."""
    blocks = _blocks(model, where)
    _layers(cfg, len(blocks), where)
    n = _num_patches(model)
    if cfg.start_tokens > n:
        raise ConfigError(f"{where}.start_tokens {cfg.start_tokens} is larger than the sequence ({n} patch tokens)")


def apply_token_drop(model: nn.Module, cfg: TokenDropConfig | None, hooks: Hooks, *, seed: int, rank: int = 0,
                     where: str = "token_drop") -> None:
    """Swap the chosen blocks of ``model`` (in place) and register the schedule on ``hooks``:
    a before-step hook that sets the kept-token count (by step, or by the spent budget under
    budget_s), and (``layer_token_lr``) the trainer's schedule clock. A no-op for ``cfg`` None."""
    if cfg is None:
        return
    check_token_drop(model, cfg, where)
    blocks, n = _blocks(model), _num_patches(model)
    layers = _layers(cfg, len(blocks), where)
    state = _DropState(seed=seed, rank=rank, keep=n)
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    for i in layers:
        block = blocks[i]
        block.__class__ = _drop_class(type(block))
        block._ltd, block._ltd_prefix = state, prefix
        state.layer_ids[id(block)] = i
    sizes = token_counts(cfg, n)
    print(f"token_drop: blocks {layers} keep {cfg.start_tokens}..{n} of {n} patch tokens; "
          f"{len(sizes)} distinct token counts {sizes} (at most {len(sizes)} compiled shapes)")

    def set_keep(_model: nn.Module, global_step: int, total_steps: int) -> None:
        # The subsets stay keyed to the step; the count follows the budget clock under budget_s.
        position = hooks.budget_position(global_step) if hooks.budget_position is not None else global_step
        state.step, state.keep = global_step, kept_tokens(cfg, n, int(position), total_steps)

    hooks.before_step.append(set_keep)
    if cfg.layer_token_lr:
        hooks.schedule_clock = layer_token_clock(cfg, n, len(blocks), len(layers))


def layer_token_clock(cfg: TokenDropConfig, num_patches: int, depth: int, dropping: int) -> Callable[[int, int], float]:
    """(global_step, total_steps) -> schedule position in [0, total_steps]: the fraction of the
    run's layer-tokens consumed so far, times total_steps (the LR decays by work, not steps)."""
    def per_step(step: int, total: int) -> int:
        return (depth - dropping) * num_patches + dropping * kept_tokens(cfg, num_patches, step, total)

    cache: dict[int, list[int]] = {}

    def clock(global_step: int, total_steps: int) -> float:
        if total_steps not in cache:  # cumulative layer-tokens before each step
            acc, cum = 0, [0]
            for s in range(total_steps):
                acc += per_step(s, total_steps)
                cum.append(acc)
            cache[total_steps] = cum
        cum = cache[total_steps]
        return total_steps * cum[min(global_step, total_steps)] / cum[-1]

    return clock


def layer_tokens(cfg: TokenDropConfig, num_patches: int, depth: int, dropping: int, total_steps: int,
                 batch: int) -> tuple[int, int]:
    """(processed, dense) block-token counts over a run of ``total_steps`` steps."""
    kept = sum(kept_tokens(cfg, num_patches, s, total_steps) for s in range(total_steps))
    dense = depth * num_patches * total_steps * batch
    return dense - dropping * (num_patches * total_steps - kept) * batch, dense


def remove_token_drop(model: nn.Module) -> nn.Module:
    """Swap every dropping block back to its timm class: the plain dense model."""
    for m in model.modules():
        if isinstance(m, _TokenDropMixin):
            m.__class__ = type(m).__mro__[2]
            del m._ltd, m._ltd_prefix
    return model


def setup_token_drop(blocks: dict[str, Any], ts: Any) -> None:
    """Trainer extension (``token_drop``): the model's (the student's) blocks drop tokens."""
    apply_token_drop(ts.model, blocks["token_drop"], ts.hooks, seed=ts.seed, rank=ts.dist.rank,
                     where=f"{ts.where}.token_drop")


def preflight_token_drop(blocks: dict[str, Any], recipe: Any, index: int, where: str,
                         skeleton: Callable[[], nn.Module | None]) -> None:
    """Before the run: block indices, start_tokens and transformer blocks on the recipe's model."""
    model = skeleton()
    if model is not None:
        check_token_drop(model, blocks["token_drop"], f"{where}.token_drop")
