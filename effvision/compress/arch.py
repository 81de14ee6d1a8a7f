"""The architecture of a pruned model as JSON: what differs from the dense timm model.

A pruned model is the dense ``timm.create_model`` output with smaller tensors and a few
changed module attributes (``in_features``, ``num_heads``, ``num_features``, ...). We record
exactly those differences, as the ``prune`` mode's metadata in the model's record, so
``create_model(spec)`` rebuilds the pruned model in a fresh process (no pickle), and
``load_weights`` then fills it.

    {"kept_blocks": [0, 1, 3],                                   # a ViT's blocks kept (depth), if any dropped
     "tensors": {"blocks.0.attn.qkv.weight": [144, 96], ...},     # parameter/buffer shapes
     "attrs": {"blocks.0.attn": {"num_heads": 2, "attn_dim": 64}, ...}}

Dropped blocks are removed first, so ``tensors`` and ``attrs`` name the kept blocks by their new
positions (``blocks.2`` is the dense model's block 3 above).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["architecture", "describe_pruned", "apply_pruned", "keep_blocks"]

_SCALARS = (int, float, str)


def _jsonable(value: Any) -> bool:
    """Plain data we can store and compare: numbers, strings, and lists/tuples/dicts of them."""
    if isinstance(value, bool) or isinstance(value, _SCALARS) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return False


def _plain(value: Any) -> Any:
    """Tuples become lists, as JSON stores them."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _attrs(module: nn.Module) -> dict[str, Any]:
    # feature_info is a timm FeatureInfo/list of dicts on the root; it is plain data too.
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and _jsonable(v)}


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def architecture(model: nn.Module) -> dict[str, Any]:
    """What pruning may change, as plain data: every tensor's shape, every module's type and
    plain attributes (a snapshot taken before pruning, compared after it)."""
    return {"tensors": {name: tuple(t.shape) for name, t in _tensors(model).items()},
            "modules": {name: (type(m), {k: _plain(v) for k, v in _attrs(m).items()})
                        for name, m in model.named_modules()}}


def describe_pruned(pruned: nn.Module, dense: nn.Module | dict[str, Any]) -> dict[str, Any]:
    """The tensor shapes and module attributes of ``pruned`` that differ from ``dense`` (the
    model before pruning, or its ``architecture`` snapshot)."""
    before = dense if isinstance(dense, dict) else architecture(dense)
    tensors = {name: list(t.shape) for name, t in _tensors(pruned).items()
               if name in before["tensors"] and tuple(t.shape) != before["tensors"][name]}
    attrs: dict[str, dict[str, Any]] = {}
    for name, module in pruned.named_modules():
        ref = before["modules"].get(name)
        if ref is None or ref[0] is not type(module):
            raise TypeError(f"pruning changed the module tree at '{name}'; only sizes may change")
        changed = {k: _plain(v) for k, v in _attrs(module).items() if ref[1].get(k) != _plain(v)}
        if changed:
            attrs[name] = changed
    return {"tensors": tensors, "attrs": attrs}


def keep_blocks(model: nn.Module, kept: list[int]) -> None:
    """Keep only the ViT blocks ``kept`` (indices into ``model.blocks``), in order: a dropped block
    becomes the identity on the residual stream. By hand: Torch-Pruning has no block removal."""
    blocks = model.blocks
    model.blocks = nn.Sequential(*(blocks[i] for i in kept))
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and len(info) == len(blocks):  # timm's one entry per block, named by position
        model.feature_info = [{**info[i], "module": f"blocks.{j}"} if isinstance(info[i], dict) else info[i]
                              for j, i in enumerate(kept)]


def apply_pruned(model: nn.Module, pruned: dict[str, Any]) -> nn.Module:
    """Resize ``model`` (a fresh dense timm model) in place to the recorded pruned architecture.

    Dropped blocks go first (``kept_blocks``: the names that follow are the kept blocks' new ones).
    Tensors are replaced by uninitialised ones of the recorded shape: the caller loads the pruned
    weights next (``load_weights`` is strict, so a missed tensor is an error there).
    """
    if "kept_blocks" in pruned:
        keep_blocks(model, [int(i) for i in pruned["kept_blocks"]])
    for name, shape in pruned.get("tensors", {}).items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, attr)
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            owner._buffers[attr] = new
    for name, values in pruned.get("attrs", {}).items():
        module = model.get_submodule(name)
        for key, value in values.items():
            current = getattr(module, key, None)
            setattr(module, key, tuple(value) if isinstance(current, tuple) else value)
    return model
