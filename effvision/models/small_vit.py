"""Vision Transformers for small (32x32) images, registered in timm's model registry.

After ``import effvision`` they are ordinary timm models: ``timm.create_model('vit_tiny_patch4_32')``
returns a ``timm.models.VisionTransformer`` with the full timm contract (forward_features,
forward_head, forward_intermediates, set_grad_checkpointing, reset_classifier, ...).

Two families:
- ``vit_*_patch4_32``: plain ViTs, 4x4 patches -> 64 tokens + CLS.
- ``convvit_*_32``: the same blocks behind a small convolutional tokenizer (timm's HybridEmbed
  over a conv stem), mean-pooled, no CLS token. On small data the conv stem supplies the
  locality prior that plain patch embeddings lack (CCT, Hassani et al. 2021; baselines.md:
  +5 points on CIFAR-10 in less time).
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch.nn as nn
from timm.layers import ConvNormAct, HybridEmbed
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["ConvTokenizer"]



def _cfg(first_conv: str = "patch_embed.proj") -> dict[str, Any]:
    return {"url": "", "input_size": (3, 32, 32), "num_classes": 10, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
            "crop_pct": 1.0, "interpolation": "bicubic", "first_conv": first_conv, "classifier": "head"}


# timm's registry reads a module's default_cfgs when @register_model runs: keep it above them.
default_cfgs = generate_default_cfgs({
    "vit_micro_patch4_32": _cfg(),
    "vit_tiny_patch4_32": _cfg(),
    "vit_small_patch4_32": _cfg(),
    "convvit_tiny_32": _cfg("patch_embed.backbone.0.conv"),
    "convvit_small_32": _cfg("patch_embed.backbone.0.conv"),
})


def _has_weights_source(cfg: Any) -> bool:
    """A pretrained_cfg naming weights: a trained model dir (timm's local-dir:) or a hub repo."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    return cfg is not None and not isinstance(cfg, str) and any(get(k) for k in ("file", "hf_hub_id", "url"))


def _vit(model_name: str, pretrained: bool, defaults: dict[str, Any], **kwargs: Any) -> VisionTransformer:
    if pretrained and not _has_weights_source(kwargs.get("pretrained_cfg")):
        raise ValueError(f"{model_name} has no pretrained weights; train it with an effvision recipe "
                         f"(then timm.create_model('local-dir:RUN/NN-train/model', pretrained=True) loads it)")
    args = {"img_size": 32, **defaults, **kwargs}
    return build_model_with_cfg(VisionTransformer, model_name, pretrained=pretrained, **args)


@register_model
def vit_micro_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """4 blocks, width 96: the quickstart model (CPU-trainable in about a minute)."""
    return _vit("vit_micro_patch4_32", pretrained, dict(patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0), **kwargs)


@register_model
def vit_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """9 blocks, width 192: the CIFAR-10 baseline ViT of baselines.md."""
    return _vit("vit_tiny_patch4_32", pretrained, dict(patch_size=4, embed_dim=192, depth=9, num_heads=3, mlp_ratio=3.0), **kwargs)


@register_model
def vit_small_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """8 blocks, width 384."""
    return _vit("vit_small_patch4_32", pretrained, dict(patch_size=4, embed_dim=384, depth=8, num_heads=6, mlp_ratio=3.0), **kwargs)


class ConvTokenizer(nn.Sequential):
    """Conv stem for HybridEmbed: 3x3 convs with BN+GELU, downsampling by max-pool.

    ``widths`` lists the conv widths; ``pool_after`` the indices of convs followed by a 2x2
    max-pool. A 32x32 input with two pools yields an 8x8 grid (64 tokens).
    """

    def __init__(self, in_chans: int, widths: tuple[int, ...], pool_after: tuple[int, ...]) -> None:
        layers: list[nn.Module] = []
        prev = in_chans
        for i, width in enumerate(widths):
            layers.append(ConvNormAct(prev, width, kernel_size=3, act_layer=nn.GELU))
            if i in pool_after:
                layers.append(nn.MaxPool2d(2))
            prev = width
        super().__init__(*layers)
        self.out_chs = prev


def _convvit(model_name: str, pretrained: bool, widths: tuple[int, ...], pool_after: tuple[int, ...],
             defaults: dict[str, Any], **kwargs: Any) -> VisionTransformer:
    in_chans = kwargs.get("in_chans", 3)
    stem = ConvTokenizer(in_chans, widths, pool_after)
    stride = 2 ** len(pool_after)
    embed = partial(HybridEmbed, backbone=stem, feature_ratio=stride, feature_size=None)
    # patch_size=1 on the stem's grid; timm's HybridEmbed projects the stem output to embed_dim.
    return _vit(model_name, pretrained, dict(patch_size=1, embed_layer=embed, class_token=False,
                                             global_pool="avg", fc_norm=False, **defaults), **kwargs)


@register_model
def convvit_tiny_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Conv tokenizer (64, 192; 64 tokens) + 7 blocks of width 192: baselines.md's hybrid."""
    return _convvit("convvit_tiny_32", pretrained, (64, 192), (0, 1),
                    dict(embed_dim=192, depth=7, num_heads=3, mlp_ratio=3.0), **kwargs)


@register_model
def convvit_small_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Deeper conv tokenizer (64, 128, 256; 64 tokens) + 6 blocks of width 256."""
    return _convvit("convvit_small_32", pretrained, (64, 128, 256), (1, 2),
                    dict(embed_dim=256, depth=6, num_heads=4, mlp_ratio=2.0), **kwargs)
