"""Which parameters GaLore projects: weights whose names match target patterns.

For timm ViTs the default targets are the block matrices (attn.qkv, attn.proj, mlp.fc1,
mlp.fc2); the patch embedding (its conv is also called ``proj``), norms, biases, tokens and
the head stay dense. Patterns are regular expressions searched in the parameter name.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn as nn

from ..errors import ConfigError

__all__ = ["VIT_TARGETS", "ParamSplit", "split_params"]

# anchored on the block's submodule so that patch_embed.proj does not match
VIT_TARGETS: tuple[str, ...] = (r"(^|\.)attn\.qkv\.weight$", r"(^|\.)attn\.proj\.weight$",
                                r"(^|\.)mlp\.fc1\.weight$", r"(^|\.)mlp\.fc2\.weight$")


@dataclass
class ParamSplit:
    galore: list[tuple[str, nn.Parameter]]    # projected
    decay: list[tuple[str, nn.Parameter]]     # dense, with weight decay
    no_decay: list[tuple[str, nn.Parameter]]  # dense: biases, norms, tokens (timm's no_weight_decay)


def split_params(model: nn.Module, targets: Sequence[str] | None = None) -> ParamSplit:
    """Partition trainable parameters; each pattern must match at least one matrix."""
    patterns = []
    for t in targets or VIT_TARGETS:
        try:
            patterns.append(re.compile(t))
        except re.error as e:
            raise ConfigError(f"GaLore target pattern {t!r} is not a valid regular expression: {e}") from e
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    split = ParamSplit([], [], [])
    hits = dict.fromkeys(patterns, 0)
    for name, p in named:
        matched = [pat for pat in patterns if pat.search(name)]
        for pat in matched:
            hits[pat] += 1
        if matched:
            if p.ndim < 2:
                raise ConfigError(f"GaLore target {matched[0].pattern!r} matches {name} of shape {tuple(p.shape)}; "
                                  f"only matrices (and conv weights) can be projected")
            split.galore.append((name, p))
        elif p.ndim <= 1 or name.endswith(".bias") or name in skip:
            split.no_decay.append((name, p))
        else:
            split.decay.append((name, p))
    missing = [pat.pattern for pat, n in hits.items() if n == 0]
    if missing:
        some = ", ".join(n for n, p in named if p.ndim >= 2)[:200]
        raise ConfigError(f"GaLore target pattern(s) {missing} match no trainable parameter of "
                          f"{type(model).__name__} (matrices: {some}...)")
    return split
