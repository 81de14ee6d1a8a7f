"""Structured pruning of a detector's backbone: the trunk's channels and the neck's inputs shrink,
the pyramid's output width (``out_channels``, what the shared heads consume) does not.

Torch-Pruning's dependency graph is built over ``detector.backbone`` (the DetectionBackbone:
timm trunk + neck, forward -> OrderedDict of maps), so each trunk stage that feeds the neck is
pruned together with the neck layer reading it (FPN ``inner_blocks``; a plain ViT's simple
pyramid reads the embedding, which is kept). What is never pruned: the neck's output layers
(FPN ``layer_blocks``; the simple pyramid's final 1x1/3x3 convs and norms) and everything after
the backbone (RPN/RoI/FCOS/RetinaNet heads), which therefore keep their weights and shapes.

What ``ratio`` removes (effvision.compress.prune's kinds): CNN trunks and the neck's inner
layers, that fraction of each conv/linear group's channels (``channels``, and ``mlp`` where a
block has a timm Mlp, as ConvNeXt); ViT trunks, that fraction of attention heads (whole heads,
at least one kept) and of MLP hidden units; a ViT's embedding width is kept. Magnitude criteria
only (l1, l2, random): the data-driven ones rank by a classification loss's gradients.

The change is a ``prune`` mode entry in the detector's record (``models.modes``): tensor shapes
and module attributes that differ from the dense detector (``compress.arch.describe_pruned``,
names relative to the whole detector), written to ``DetectorSpec.modes`` and replayed by
``build_from_spec`` before the weights load. The pruning runs on a copy of the backbone, so a
refusal or failure leaves the detector as it was.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from torchvision.ops import FeaturePyramidNetwork

from ..attention.module import SparseAttention
from ..compress.arch import architecture, describe_pruned
from ..compress.importance import get_criterion
# effvision.compress.prune's handlers for timm families (private there; the classifier path owns them)
from ..compress.prune import MODE, UNSUPPORTED, _attention_internals, _family, _fix_attention, _qk_norms_hidden, kinds_of
from ..errors import ConfigError, EffVisionError
from ..models.modes import ModeRuleError, add_mode, check_next, record_of
from .backbone import DetectionBackbone, SimpleFeaturePyramid

__all__ = ["prune_detector_", "MAGNITUDE_CRITERIA", "detector_size", "backbone_macs", "check_prunable"]

MAGNITUDE_CRITERIA = ("l1", "l2", "random")


def detector_size(detector: nn.Module) -> tuple[int, int]:
    """(H, W) the backbone sees at the detector's own size: its fixed size, else ``min_size``
    square rounded up to the transform's padding multiple (as export_detection's default)."""
    body = detector.backbone
    if body.fixed_size is not None:
        return tuple(body.fixed_size)  # type: ignore[return-value]
    transform = detector.transform
    if getattr(transform, "fixed_size", None):
        w, h = transform.fixed_size  # torchvision's is (W, H)
        return int(h), int(w)
    multiple = math.lcm(32, body.divisor)
    side = math.ceil(int(transform.min_size[0]) / multiple) * multiple
    return side, side


def backbone_macs(detector: nn.Module, size: tuple[int, int] | None = None) -> int:
    """MACs of the backbone (trunk + neck) on one image at ``size`` (default: ``detector_size``),
    counted as every effvision summary counts them (torch's FlopCounterMode)."""
    from ..models.catalog import count_macs

    body = detector.backbone
    h, w = size or detector_size(detector)
    device = next(body.parameters()).device
    return count_macs(body, torch.zeros(1, body.spec.in_chans, h, w, device=device))


def check_prunable(detector: nn.Module, ratio: float, criterion: str, round_to: int | None) -> None:
    """The cheap refusals, before any work (one line each)."""
    if not isinstance(getattr(detector, "backbone", None), DetectionBackbone):
        raise EffVisionError(f"prune_detector_ takes an effvision detector (backbone: DetectionBackbone), got "
                             f"{type(detector).__name__} with backbone {type(getattr(detector, 'backbone', None)).__name__}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ConfigError(f"prune ratio {ratio!r} is outside (0, 1) (the fraction of channels removed)")
    if get_criterion(criterion).needs_data:  # an unknown name: the registry's one-line ConfigError
        raise ConfigError(f"criterion '{criterion}' ranks channels by a classification loss's gradients; a detector's "
                          f"backbone is pruned by magnitude ({', '.join(MAGNITUDE_CRITERIA)})")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to <= 0):
        raise ConfigError(f"prune round_to {round_to!r} must be a positive integer (or None)")
    body = detector.backbone
    trunk = body.body.model
    if type(trunk).__name__ in UNSUPPORTED:
        raise EffVisionError(f"no handler covers {_family(trunk)}: {UNSUPPORTED[type(trunk).__name__]}")
    if any(isinstance(m, SparseAttention) for m in body.modules()):
        raise ModeRuleError("prune cannot follow sparse attention in a detector: its policies are per head of the "
                            "attention as profiled; prune first, then run sparse_attention on the pruned detector")
    check_next(record_of(detector), MODE)


def _neck_layers(neck: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(layers whose outputs may shrink, the output layers whose outputs keep ``out_channels``)."""
    if isinstance(neck, FeaturePyramidNetwork):
        inner = [m for m in neck.inner_blocks.modules() if isinstance(m, nn.Conv2d)]
        outputs = [m for m in neck.layer_blocks.modules() if isinstance(m, nn.Conv2d)]
        return inner, outputs
    if isinstance(neck, SimpleFeaturePyramid):
        inner, outputs = [], []
        for level in neck.levels:
            layers = list(level)
            outputs += layers[-4:]  # Conv1x1 -> LayerNorm2d -> Conv3x3 -> LayerNorm2d, all at out_channels
            inner += [m for m in layers[:-4] if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        return inner, outputs
    raise EffVisionError(f"prune: no handler covers the neck {type(neck).__name__} (FeaturePyramidNetwork or "
                         f"SimpleFeaturePyramid)")


def _map_channels(body: DetectionBackbone, example: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return [int(f.shape[1]) for f in body.body(example)]


def _fix_trunk_sizes(body: DetectionBackbone, example: torch.Tensor, dense_maps: list[int]) -> None:
    """Size attributes timm keeps on the trunk itself, read back from the pruned tensors:
    ``feature_info`` channels of the stages up to the last map taken, and ``num_features`` /
    ``head_hidden_size`` where they named the last map's width (a ViT's embedding is not pruned)."""
    trunk = body.body.model
    maps = _map_channels(body, example)
    for name in ("num_features", "head_hidden_size"):
        if getattr(trunk, name, None) == dense_maps[-1] and maps[-1] != dense_maps[-1] and not body.plain:
            setattr(trunk, name, maps[-1])
    info = getattr(trunk, "feature_info", None)
    if not isinstance(info, list) or not info:
        return
    indices = list(body.body.out_indices)
    try:
        with torch.no_grad():
            every = trunk.forward_intermediates(example, indices=list(range(max(indices) + 1)), intermediates_only=True)
    except Exception:  # a family whose forward_intermediates takes no list: the maps taken are enough
        every, indices = maps, indices
    else:
        indices = list(range(max(indices) + 1))
    for i, t in zip(indices, every):
        if isinstance(info[i], dict) and "num_chs" in info[i]:
            info[i]["num_chs"] = int(t.shape[1] if t.ndim == 4 else t.shape[-1])


def _check_maps(body: DetectionBackbone, example: torch.Tensor, shapes: list[tuple[int, ...]], family: str) -> None:
    with torch.no_grad():
        got = [tuple(m.shape) for m in body(example).values()]
    if got != shapes:
        raise EffVisionError(f"no handler covers {family}: the pruned backbone's maps changed shape {shapes} -> {got}")


def _check_detects(detector: nn.Module, example: torch.Tensor, family: str) -> None:
    """An eval forward of the whole detector on a list of images returns torchvision's detections."""
    was_training = detector.training
    detector.eval()
    try:
        with torch.no_grad():
            out = detector([example[0].clamp(0, 1)])
    finally:
        detector.train(was_training)
    if not (isinstance(out, list) and len(out) == 1 and {"boxes", "scores", "labels"} <= set(out[0])):
        raise EffVisionError(f"the pruned {family} detector returned no detections structure: {type(out).__name__}")


def prune_detector_(detector: nn.Module, ratio: float, criterion: str = "l2", round_to: int | None = 8,
                    example_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Prune ``detector``'s backbone in place (see the module doc); returns a report: params of
    the detector and of its backbone before/after, the trunk's map widths before/after and the
    record entry added. ``example_size`` (H, W) is the traced input (default: a small non-square
    size the backbone takes, or its fixed size)."""
    check_prunable(detector, ratio, criterion, round_to)
    body: DetectionBackbone = detector.backbone
    family = _family(body.body.model)
    if body.fixed_size is not None:
        if example_size is not None and tuple(example_size) != tuple(body.fixed_size):
            raise EffVisionError(f"backbone {body.spec.name} takes only {body.fixed_size}; example_size "
                                 f"{tuple(example_size)} does not fit")
        h, w = body.fixed_size
    elif example_size is not None:
        h, w = example_size
        if h % body.divisor or w % body.divisor:
            raise EffVisionError(f"example_size {(h, w)} is not a multiple of backbone {body.spec.name}'s stride "
                                 f"{body.divisor}")
    else:
        side = math.lcm(32, body.divisor)
        h, w = 2 * side, 3 * side
    device = next(body.parameters()).device
    example = torch.rand(1, body.spec.in_chans, h, w, generator=torch.Generator().manual_seed(0)).to(device)

    before = architecture(detector)
    params_before = sum(p.numel() for p in detector.parameters())
    body_params_before = sum(p.numel() for p in body.parameters())
    work: DetectionBackbone = copy.deepcopy(body).eval()  # pruned, then swapped in: a failure changes nothing
    with torch.no_grad():
        shapes = [tuple(m.shape) for m in work(example).values()]
    dense_maps = _map_channels(work, example)
    trunk = work.body.model
    kinds = kinds_of(trunk)
    inner, outputs = _neck_layers(work.neck)
    head_ratio = ratio
    if kinds["heads"]:  # keep at least one head per attention (Torch-Pruning would remove all)
        fewest = min(a.num_heads for a in kinds["heads"])
        head_ratio = min(ratio, (fewest - 1) / fewest - 1e-6) if fewest > 1 else 0.0
    # a ViT's embedding width ("width") is kept: every block, the position embedding and the neck read it
    ratio_dict: dict[nn.Module, float] = {m: ratio for kind in ("mlp", "channels") for m in kinds[kind]}
    ratio_dict.update({m: ratio for m in inner})
    ratio_dict.update({a.qkv: head_ratio for a in kinds["heads"]})
    heads = {a.qkv: a.num_heads for a in kinds["heads"]}
    internal = _attention_internals(trunk, kinds["heads"])
    try:
        # TP's default for parameters outside a layer (ConvNeXt's gamma, a ViT's cls/pos tokens: the
        # last dimension is the channel) is right for timm's; its warning about them is noise here.
        with _qk_norms_hidden(kinds["heads"]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            pruner = tp.pruner.MetaPruner(
                work, example, importance=get_criterion(criterion).build(), pruning_ratio=0.0,
                pruning_ratio_dict=ratio_dict, round_to=round_to, num_heads=heads, prune_num_heads=head_ratio > 0
                and bool(heads), prune_head_dims=False, head_pruning_ratio=head_ratio if heads else 0.0,
                ignored_layers=[*outputs, *internal, *kinds["width"]])
        pruner.step()
        work.zero_grad(set_to_none=True)
        _fix_attention(work, pruner)
        _fix_trunk_sizes(work, example, dense_maps)
        _check_maps(work, example, shapes, family)
    except EffVisionError:
        raise
    except Exception as e:  # Torch-Pruning fails in many ways on graphs it does not understand
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EffVisionError(f"no handler covers {family}: Torch-Pruning failed ({type(e).__name__}: {msg[:200]})") from e
    work.train(body.training)
    detector.backbone = work
    try:
        _check_detects(detector, example, family)
        metadata = describe_pruned(detector, before)
    except Exception as e:
        detector.backbone = body
        if isinstance(e, EffVisionError):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise EffVisionError(f"no handler covers {family}: {type(e).__name__}: {msg[:200]}") from e
    config = {"ratio": float(ratio), "criterion": criterion, "round_to": round_to}
    entry = add_mode(detector, MODE, config, metadata)
    return {"params_before": params_before, "params_after": sum(p.numel() for p in detector.parameters()),
            "backbone_params_before": body_params_before,
            "backbone_params_after": sum(p.numel() for p in work.parameters()),
            "maps_before": dense_maps, "maps_after": _map_channels(work, example),
            "out_channels": work.out_channels, "example_size": [h, w], "entry": entry}
