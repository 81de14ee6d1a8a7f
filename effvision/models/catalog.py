"""The catalog behind `effvision models`: efficient backbones with params and GMACs.

MACs are counted with torch.utils.flop_counter (FLOPs / 2) on the meta device, so no
weights are allocated and nothing is downloaded.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["EFFICIENT_FAMILIES", "ModelCost", "list_efficient_models", "model_cost", "count_params_macs", "count_macs"]

# timm name patterns of the efficient families effvision targets, effvision's own first.
EFFICIENT_FAMILIES: tuple[str, ...] = (
    "vit_*_patch4_32", "convvit_*_32",
    "deit_*", "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
    "efficientvit_b*", "efficientvit_m*",
    "mobilenetv3_*", "mobilenetv4_*",
    "levit_*", "fastvit_*",
    "convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny",
    "resnet18", "resnet34", "resnet50",
    "regnetx_002", "regnetx_004", "regnety_002", "regnety_004", "regnety_008",
    "tiny_vit_*",
)


@dataclass
class ModelCost:
    name: str
    params_m: float
    gmacs: float
    input_size: tuple[int, int, int]


def list_efficient_models(pattern: str | None = None) -> list[str]:
    """Registered timm names in the efficient families, optionally filtered (fnmatch)."""
    import effvision.models.small_vit  # noqa: F401

    names: list[str] = []
    for fam in EFFICIENT_FAMILIES:
        names.extend(n for n in timm.list_models(fam) if n not in names)
    if pattern:
        pat = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        names = [n for n in names if fnmatch.fnmatch(n, pat)]
    return names


def model_cost(name: str, input_size: tuple[int, int, int] | None = None) -> ModelCost:
    """Params (millions) and GMACs of one forward pass at the model's default resolution."""
    with torch.device("meta"):
        model = timm.create_model(name)
    model.eval()
    size = tuple(input_size or model.pretrained_cfg.get("input_size", (3, 224, 224)))
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS)
    with counter, torch.no_grad():
        model(torch.empty(1, *size, device="meta"))
    return ModelCost(name, params / 1e6, counter.get_total_flops() / 2e9, size)  # type: ignore[arg-type]


def _cpu_sdpa_flop(query: torch.Size, key: torch.Size, value: torch.Size, *args: Any, out_shape: Any = None,
                   **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


# torch's counter knows the CUDA fused-attention kernels but not the CPU one, so on the CPU it
# counted no attention at all (17-18% of a small ViT's MACs; the meta device took another path).
_CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def count_macs(model: torch.nn.Module, example: torch.Tensor) -> int:
    """MACs of one eval-mode forward pass on ``example`` (attention matmuls included on every
    device). The one counter for summaries and pruning budgets alike, so their fractions agree."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS)
    with counter, torch.no_grad():
        model(example)
    model.train(was_training)
    return counter.get_total_flops() // 2


def count_params_macs(model: torch.nn.Module, input_size: tuple[int, int, int]) -> tuple[float, float]:
    """(params in millions, GMACs of one forward pass) of an instantiated model."""
    params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    return params / 1e6, count_macs(model, torch.zeros(1, *input_size, device=device)) / 1e9
