"""Any timm (or effvision) model as a torchvision detection backbone.

``backbone(source)`` returns a module whose forward gives an OrderedDict of feature maps
(names "0", "1", "2", "pool"; strides 8, 16, 32, 64) and which carries ``out_channels``: the
contract of torchvision's FasterRCNN, RetinaNet and FCOS.

- Hierarchical models (CNNs, EfficientViT, TinyViT, LeViT, ...): timm's FeatureGetterNet
  (the ``features_only`` wrapper that works on an already built model, so trained or pruned
  weights stay) takes the stages that timm's ``feature_info`` lists at strides 8/16/32,
  then torchvision's FeaturePyramidNetwork.
- Plain ViTs (one stride throughout): the last block's map through a ViTDet-style simple
  feature pyramid (Li et al., 2022), with timm's ``dynamic_img_size`` switched on, because
  torchvision's transform feeds variable, non-square sizes.

Channels and strides are read from a probe forward pass, not from ``feature_info`` alone:
a pruned model keeps its original ``feature_info`` but not its original widths.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Format, LayerNorm2d
from timm.models._features import FeatureGetterNet  # timm's features_only="getter" wrapper (not re-exported)
from torchvision.ops import FeaturePyramidNetwork

from ..errors import EffVisionError
from ..models.io import ModelSpec
from .source import load_trunk

__all__ = ["DetectionBackbone", "SimpleFeaturePyramid", "backbone"]

PYRAMID_STRIDES = (8, 16, 32)  # then one max-pooled level at 64, as torchvision's FPN backbones


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one map at ``in_stride`` rescaled to each target stride
    (transposed convs up, max-pool down), each projected by 1x1 + 3x3 convs with LayerNorm."""

    def __init__(self, in_channels: int, in_stride: int, out_channels: int,
                 strides: tuple[int, ...] = PYRAMID_STRIDES) -> None:
        super().__init__()
        self.levels = nn.ModuleList(_level(in_channels, in_stride, stride, out_channels) for stride in strides)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # x: (B, C, H/s, W/s)
        return [level(x) for level in self.levels]


def _level(channels: int, in_stride: int, stride: int, out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    if stride < in_stride:  # upsample by transposed 2x2 convs, halving channels each time (ViTDet)
        for i in range(int(math.log2(in_stride // stride))):
            if i:
                layers += [LayerNorm2d(channels), nn.GELU()]
            layers.append(nn.ConvTranspose2d(channels, channels // 2, 2, stride=2))
            channels //= 2
    elif stride > in_stride:
        layers.append(nn.MaxPool2d(stride // in_stride))
    return nn.Sequential(*layers, nn.Conv2d(channels, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                         nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels))


class DetectionBackbone(nn.Module):
    """Trunk (timm feature extractor) + neck; forward -> OrderedDict of (B, out_channels, h, w)."""

    def __init__(self, body: nn.Module, neck: nn.Module, out_channels: int, strides: list[int],
                 divisor: int, fixed_size: tuple[int, int] | None, spec: ModelSpec, plain: bool) -> None:
        super().__init__()
        self.body, self.neck = body, neck
        self.out_channels = out_channels
        self.strides = strides                    # one per output map, e.g. [8, 16, 32, 64]
        self.names = [str(i) for i in range(len(strides) - 1)] + ["pool"]
        self.divisor = divisor                    # input sides must be multiples of this (unless fixed)
        self.fixed_size = fixed_size              # (H, W) when the trunk takes no other size
        self.spec = spec                          # how to rebuild the trunk (name, kwargs, mean/std)
        self.plain = plain

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:  # x: (B, 3, H, W)
        h, w = x.shape[-2:]
        if self.fixed_size is not None:
            if (h, w) != self.fixed_size:
                    raise EffVisionError(f"backbone {self.spec.name} takes only {self.fixed_size[0]}x{self.fixed_size[1]} "
                                     f"inputs, got {h}x{w} (build the detector with its fixed_size)")
        elif h % self.divisor or w % self.divisor:
            raise EffVisionError(f"backbone {self.spec.name} needs image sides that are multiples of {self.divisor}, "
                                 f"got {h}x{w}")
        feats = self.body(x)
        if self.plain:
            maps = self.neck(feats[-1])
        else:
            maps = list(self.neck(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())
        maps.append(F.max_pool2d(maps[-1], kernel_size=1, stride=2))  # stride-2 subsample: torchvision's "pool"
        return OrderedDict(zip(self.names, maps))


def backbone(source: str | Path | nn.Module, *, out_channels: int = 256, kwargs: dict[str, Any] | None = None,
             pretrained: bool = False, spec: ModelSpec | None = None) -> DetectionBackbone:
    """A torchvision-compatible detection backbone from a timm/effvision name, a model
    directory, a run directory (its newest model), or a timm module (pass its ``spec`` to
    make the detector saveable). A module passed in is changed in place: layers after the
    last map taken and its classifier are dropped; a plain ViT takes any input size."""
    if isinstance(source, nn.Module):
        model = source
        spec = spec or ModelSpec(name=type(source).__name__, num_classes=0)
    else:
        model, spec = load_trunk(source, kwargs, pretrained)
    _refuse_modes(model, spec)
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise EffVisionError(f"model {spec.name} has no feature info (timm feature_info and forward_intermediates); "
                             f"it cannot serve as a detection backbone")
    reductions = [int(i["reduction"]) for i in info]
    plain = len(set(reductions)) == 1
    if plain:
        _enable_dynamic_size(model)
        indices = [len(reductions) - 1]
    else:
        # The last stage at each stride >= 8, the three finest of those.
        last_at = {r: i for i, r in enumerate(reductions) if r >= 8}
        indices = [last_at[r] for r in sorted(last_at)][:3]
        if not indices:
            raise EffVisionError(f"model {spec.name} has no feature map at stride 8 or coarser (feature_info: {reductions})")
    model.eval()
    indices = _prune(model, indices)
    body = FeatureGetterNet(model, out_indices=indices, prune=False)
    divisor = max(reductions)  # input sides: multiples of the trunk's coarsest stride
    channels, fixed = _probe(body, spec, divisor)
    strides = [reductions[i] for i in indices]
    if plain:
        neck: nn.Module = SimpleFeaturePyramid(channels[0], strides[0], out_channels)
        out_strides = list(PYRAMID_STRIDES)
    else:
        neck = FeaturePyramidNetwork(channels, out_channels)
        out_strides = strides
    body.train()
    return DetectionBackbone(body, neck, out_channels, out_strides + [2 * out_strides[-1]],
                             divisor, fixed, spec, plain)


# What a detection backbone cannot carry over from a classifier's record, and why.
_NOT_IN_DETECTORS = {
    "reduce_tokens": "token merging/pruning (ToMe, EViT) drops tokens block by block, and the detector's pyramid "
                     "is built from the full token grid",
    "early_exit": "its exits end a classifier at an intermediate block; the detector reads the trunk's maps",
}


def _refuse_modes(model: nn.Module, spec: ModelSpec) -> None:
    from ..models.modes import RECORD_ATTR, record_of

    modes = [e["mode"] for e in (record_of(model) if hasattr(model, RECORD_ATTR) else spec.modes)]
    for mode in modes:
        if mode in _NOT_IN_DETECTORS:
            raise EffVisionError(f"model {spec.name} went through {mode}, which a detection backbone cannot keep: "
                                 f"{_NOT_IN_DETECTORS[mode]} (use the model from before that stage)")


def _prune(model: nn.Module, indices: list[int]) -> list[int]:
    """Drop the layers after the last map taken and the classifier (what FeatureGetterNet's
    own pruning does), keeping the classifier where timm cannot drop it."""
    if not hasattr(model, "prune_intermediate_layers"):
        return indices
    try:
        return model.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
    except AssertionError:  # timm 1.0.29's EfficientViT (MIT) head asserts on removal: keep it, unused
        return model.prune_intermediate_layers(indices, prune_norm=True, prune_head=False)


def _enable_dynamic_size(model: nn.Module) -> None:
    """Switch a built timm ViT to any input size (multiple of the patch size), as the
    ``dynamic_img_size=True`` constructor argument would: the position embedding is
    resampled to each input's grid."""
    if not hasattr(model, "dynamic_img_size") or not hasattr(model, "patch_embed"):
        return
    embed = model.patch_embed
    model.dynamic_img_size = True
    embed.strict_img_size = False
    embed.flatten = False
    embed.output_fmt = Format.NHWC


@torch.no_grad()
def _probe(body: nn.Module, spec: ModelSpec, divisor: int) -> tuple[list[int], tuple[int, int] | None]:
    """Channels per map, and the fixed input size if the trunk takes only its own (LeViT:
    attention biases tied to one grid). Tries a small non-square input first, then its own size."""
    side = math.lcm(32, divisor)
    small = (2 * side, 3 * side)
    try:
        feats = body(torch.zeros(1, spec.in_chans, *small))
        fixed = None
    except Exception as small_error:  # models fail on foreign sizes in many ways (asserts, shape errors)
        own = (spec.img_size, spec.img_size)
        try:
            feats = body(torch.zeros(1, spec.in_chans, *own))
        except Exception as e:
            raise EffVisionError(f"backbone {spec.name} does not run at {small[0]}x{small[1]} "
                                 f"({_first_line(small_error)}) nor at its own {own[0]}x{own[1]} ({_first_line(e)})") from e
        fixed = own
    return [int(f.shape[1]) for f in feats], fixed


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
