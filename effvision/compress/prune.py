"""Structured pruning of timm models: tensors really shrink, the result is a plain timm model.

Torch-Pruning's dependency graph finds the coupled tensors (a conv's BN, a residual group,
a ViT's embedding width through patch embed, cls/pos tokens, every norm, qkv/proj, fc1/fc2
and the head). effvision adds what it lacks for timm:

- timm ``Attention``: heads are removed whole, then ``num_heads``/``attn_dim`` are set to
  match (Torch-Pruning leaves them stale, so forward crashes); fused SDPA stays on.
- root attributes that name sizes (``num_features``, ``embed_dim``, ``head_hidden_size``,
  ``feature_info`` channels), so forward_head/forward_intermediates and detection
  backbones see the pruned widths.
- a check after pruning that the model still runs and keeps its output shape: a family
  that Torch-Pruning cannot handle fails here with "no handler covers <family>" instead of
  training a broken model.

Kinds and their ratios: ``heads`` (timm Attention), ``mlp`` (hidden units of timm Mlp),
``width`` (ViT embedding width), ``channels`` (every other conv/linear group). Depth: a ViT's
whole blocks can be dropped too (``PruneSpec.drop_blocks``, what a HALP allocation gives), by hand
before Torch-Pruning runs, and the kept blocks are recorded (``compress.arch``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from timm.layers import Mlp
from timm.layers.attention import Attention

from ..errors import EffVisionError
from ..models.catalog import count_macs
from ..models.modes import add_mode, check_next, record_of
from .arch import apply_pruned, architecture, describe_pruned, keep_blocks
from .importance import get_criterion

__all__ = ["PruneSpec", "KINDS", "MODE", "DEFAULT_CRITERION", "prune_", "convert_pruned", "restore_pruned", "kinds_of",
           "check_ignored", "model_macs_params"]

KINDS = ("heads", "mlp", "width", "channels")
MODE = "prune"
# One default for the API, recipes and the CLI: magnitude needs no data, and on the quickstart
# model it kept the most accuracy before fine-tuning (README: l1 81.6%, l2 76.7%, taylor 69.3%).
DEFAULT_CRITERION = "l2"
# Model classes Torch-Pruning 1.6.1 cannot handle in bounded time: its dependency graph does not
# terminate on efficientvit_m's cascaded group attention (measured: >3 GB, minutes, at 64x64).
UNSUPPORTED = {"EfficientVitMsra": "Torch-Pruning's dependency graph does not terminate on its cascaded group attention"}
Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PruneSpec:
    """What to remove: a fraction per kind (0 keeps it), ranked by ``criterion``."""

    ratios: dict[str, float] = field(default_factory=dict)   # kind -> fraction removed
    criterion: str = DEFAULT_CRITERION  # l1 | l2 | random | taylor | obd (effvision.compress.importance)
    round_to: int | None = None       # keep channel counts multiples of this (8, 16 for tensor cores)
    ignore: list[str] = field(default_factory=list)          # module names whose outputs keep their size
    steps: int = 1                    # iterative: ratios are reached in this many steps
    # per layer, over ``ratios``: an Attention's name -> fraction of its heads removed, an Mlp fc1's
    # name -> fraction of its units (what a HALP allocation gives: effvision.compress.halp)
    layers: dict[str, float] = field(default_factory=dict)
    # a ViT's blocks removed whole (indices into ``model.blocks``; layer names above are the dense model's)
    drop_blocks: list[int] = field(default_factory=list)


def _family(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _classifier(model: nn.Module) -> list[nn.Module]:
    heads = []
    if hasattr(model, "get_classifier"):
        c = model.get_classifier()
        heads.extend(c if isinstance(c, tuple) else [c])
    heads.extend(m for n, m in model.named_modules() if n.endswith("head_dist"))  # DeiT distilled
    return [h for h in heads if isinstance(h, nn.Module) and any(True for _ in h.parameters())]


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "embed_dim")


def kinds_of(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules whose *outputs* each kind shrinks (Torch-Pruning roots)."""
    attn = [m for m in model.modules() if type(m) is Attention]
    mlp = [m.fc1 for m in model.modules() if type(m) is Mlp and isinstance(m.fc1, nn.Linear)]
    width: list[nn.Module] = []
    if _is_vit(model):
        width = [model.patch_embed.proj] + [b.attn.proj for b in model.blocks if hasattr(b.attn, "proj")] \
            + [b.mlp.fc2 for b in model.blocks if hasattr(b.mlp, "fc2")]
    taken = {id(m) for m in [*width, *mlp, *_classifier(model)]}
    for a in attn:
        taken.update(id(m) for m in a.modules())
    internal = _attention_internals(model, attn)
    taken.update(id(m) for m in internal)
    channels = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in taken]
    return {"heads": attn, "mlp": mlp, "width": width, "channels": channels}


def _attention_internals(model: nn.Module, handled: list[nn.Module]) -> list[nn.Module]:
    """Layers inside attention modules we have no head handler for (levit, efficientvit_m,
    tiny_vit, ...): their outputs are reshaped into heads, so their outputs must keep their size."""
    ids = {id(a) for a in handled}
    out = []
    for name, m in model.named_modules():
        if "attention" in type(m).__name__.lower() or name.endswith(".attn") or name.endswith(".mixer"):
            if id(m) not in ids:
                out.extend(s for s in m.modules() if isinstance(s, (nn.Conv2d, nn.Linear)))
    return out


def check_ignored(model: nn.Module, ignore: Iterable[str]) -> list[nn.Module]:
    names = dict(model.named_modules())
    missing = [n for n in ignore if n not in names]
    if missing:
        close = [n for n in names if n and any(part in n for part in missing[0].split("."))][:3]
        hint = f" (e.g. {', '.join(close)})" if close else ""
        raise EffVisionError(f"prune.ignore: no module named {', '.join(missing)} in {_family(model)}{hint}")
    return [names[n] for n in ignore]


def model_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """MACs counted as in every summary (torch.utils.flop_counter, attention matmuls included;
    Torch-Pruning's own counter leaves those out and reads 17-18% lower on ViTs)."""
    return count_macs(model, example), sum(p.numel() for p in model.parameters())


def prune_(model: nn.Module, spec: PruneSpec, example: torch.Tensor, batches: Batches | None = None,
           between_steps: Callable[[nn.Module, int], None] | None = None) -> nn.Module:
    """Prune ``model`` in place by ``spec``; ``example`` is one input batch (B, C, H, W).

    ``batches`` (x, y) feed criteria that need data (taylor, obd); ``between_steps(model, i)``
    runs after every step but the last (short fine-tuning in iterative schedules). The model's
    record gains a ``prune`` entry holding the changed shapes (``compress.arch``).
    """
    check_next(record_of(model), MODE)  # a model whose earlier modes forbid pruning: refused before any work
    bad = {k: r for k, r in spec.ratios.items() if k not in KINDS or not 0 <= r < 1}
    if bad:
        raise EffVisionError(f"prune ratios {bad}: kinds are {', '.join(KINDS)}, each ratio in [0, 1)")
    bad = {k: r for k, r in spec.layers.items() if not 0 <= r < 1}
    if bad:
        raise EffVisionError(f"prune layer ratios {bad}: each in [0, 1)")
    if type(model).__name__ in UNSUPPORTED:
        raise EffVisionError(f"no handler covers {_family(model)}: {UNSUPPORTED[type(model).__name__]}")
    criterion = get_criterion(spec.criterion)
    if criterion.needs_data and not batches:
        raise EffVisionError(f"criterion '{spec.criterion}' needs calibration batches")
    ignored = check_ignored(model, spec.ignore)
    per_layer = _layer_modules(model, kinds_of(model), spec.layers)
    kept = _kept_blocks(model, spec.drop_blocks, per_layer)
    if kept is not None:
        keep_blocks(model, kept)
    kinds = kinds_of(model)
    if kept is None and not per_layer and not any(spec.ratios.get(k, 0) > 0 and kinds[k] for k in KINDS):
        asked = {k: r for k, r in spec.ratios.items() if r > 0}
        raise EffVisionError(f"no handler covers {_family(model)} for {asked or 'no ratio'}: nothing to prune "
                             f"(this model has {', '.join(k for k in KINDS if kinds[k]) or 'no prunable kind'})")
    model.eval()
    with torch.no_grad():
        out_shape = model(example).shape
    before = architecture(model)
    importance = criterion.build()
    head_ratio = spec.ratios.get("heads", 0.0)
    if kinds["heads"]:  # keep at least one head per attention (Torch-Pruning would remove all)
        fewest = min(a.num_heads for a in kinds["heads"])
        head_ratio = min(head_ratio, (fewest - 1) / fewest - 1e-6) if fewest > 1 else 0.0
    ratio_dict = {m: spec.ratios.get(kind, 0.0) for kind in ("width", "mlp", "channels") for m in kinds[kind]}
    # Torch-Pruning visits an attention group only when its channel ratio is positive; with
    # prune_head_dims off that ratio selects nothing by itself, head_pruning_ratio does the work.
    ratio_dict.update({a.qkv: head_ratio for a in kinds["heads"]})
    # per layer: an attention's qkv gets a head ratio of its own (and a channel ratio, to be visited)
    head_dict = {m.qkv: r for m, r in per_layer.items() if isinstance(m, Attention)}
    ratio_dict.update({**{m: r for m, r in per_layer.items() if not isinstance(m, Attention)}, **head_dict})
    heads = {a.qkv: a.num_heads for a in kinds["heads"]}
    internal = _attention_internals(model, kinds["heads"])
    try:
        with _qk_norms_hidden(kinds["heads"]):
            pruner = tp.pruner.MetaPruner(
                model, example, importance=importance, pruning_ratio=0.0, pruning_ratio_dict=ratio_dict,
                iterative_steps=spec.steps, round_to=spec.round_to, num_heads=heads,
                prune_num_heads=head_ratio > 0 or any(r > 0 for r in head_dict.values()), prune_head_dims=False,
                head_pruning_ratio=head_ratio, head_pruning_ratio_dict=head_dict or None,
                ignored_layers=[*_classifier(model), *ignored, *internal])
        for step in range(spec.steps):
            if criterion.calibrate is not None:
                model.train()
                criterion.calibrate(model, importance, batches or [])
                model.eval()
            pruner.step()
            model.zero_grad(set_to_none=True)
            _fix_attention(model, pruner)
            _fix_root_sizes(model, example)
            _check_runs(model, example, out_shape)
            if between_steps is not None and step + 1 < spec.steps:
                between_steps(model, step)
                model.eval()
    except EffVisionError:
        raise
    except Exception as e:  # Torch-Pruning fails in many ways on graphs it does not understand
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EffVisionError(f"no handler covers {_family(model)}: Torch-Pruning failed ({type(e).__name__}: "
                             f"{msg[:200]})") from e
    depth = {"kept_blocks": kept} if kept is not None else {}
    add_mode(model, MODE, spec, {**depth, **describe_pruned(model, before)})
    return model


def convert_pruned(model: nn.Module, spec: PruneSpec, calib: list[torch.Tensor] | None) -> dict[str, Any]:
    """The ``prune`` mode's verb in the mode signature: the first calibration batch is the example
    input; data-driven criteria (taylor, obd) see every batch (labels unknown: zeros)."""
    if not calib:
        raise EffVisionError("prune needs an example input batch (calibration images)")
    batches = [(x, torch.zeros(len(x), dtype=torch.long, device=x.device)) for x in calib]
    before = sum(p.numel() for p in model.parameters())
    prune_(model, spec, calib[0][:2], batches)
    return {"params_fraction": sum(p.numel() for p in model.parameters()) / before}


def restore_pruned(model: nn.Module, config: dict[str, Any], metadata: dict[str, Any]) -> None:
    """The ``prune`` mode's restore: the recorded shapes on a fresh model (weights load next)."""
    apply_pruned(model, metadata)


@contextmanager
def _qk_norms_hidden(attentions: list[nn.Module]) -> Iterator[None]:
    """Torch-Pruning 1.6.1 couples timm's per-head q/k norms (LayerNorm over head_dim) to the qkv
    output channels and fails (IndexError) on any kind. Head pruning here never changes head_dim
    (prune_head_dims=False), so those norms keep their size: hide them while it traces its
    dependency graph, so it never plans to prune them, and put them back for the criteria and steps."""
    saved = [(a, a.q_norm, a.k_norm) for a in attentions]
    try:
        for a, _, _ in saved:
            a.q_norm, a.k_norm = nn.Identity(), nn.Identity()
        yield
    finally:
        for a, q, k in saved:
            a.q_norm, a.k_norm = q, k


def _layer_modules(model: nn.Module, kinds: dict[str, list[nn.Module]], layers: dict[str, float]) -> dict[nn.Module, float]:
    """``PruneSpec.layers`` as modules: each name must be a timm Attention (heads) or an Mlp's fc1."""
    if not layers:
        return {}
    allowed = {id(m) for m in [*kinds["heads"], *kinds["mlp"]]}
    names = dict(model.named_modules())
    bad = [n for n in layers if n not in names or id(names[n]) not in allowed]
    if bad:
        raise EffVisionError(f"prune layers {bad}: per-layer ratios take timm Attention modules (heads) and Mlp fc1 "
                             f"layers (units) of {_family(model)}")
    if any(isinstance(names[n], Attention) and r >= (names[n].num_heads - 1) / names[n].num_heads + 1e-9
           for n, r in layers.items()):
        raise EffVisionError("prune layers: keep at least one head per attention")
    return {names[n]: r for n, r in layers.items() if r > 0}


def _kept_blocks(model: nn.Module, drop: list[int], per_layer: dict[nn.Module, float]) -> list[int] | None:
    """The blocks that stay when ``drop`` goes (None: drop nothing); checked before any change."""
    if not drop:
        return None
    n = len(model.blocks) if _is_vit(model) else 0
    if not n:
        raise EffVisionError(f"prune drop_blocks: {_family(model)} is not a ViT with blocks to drop")
    if len(set(drop)) != len(drop) or not all(0 <= i < n for i in drop) or len(drop) >= n:
        raise EffVisionError(f"prune drop_blocks {drop}: distinct indices of the {n} blocks, at least one kept")
    dropped = {id(m) for i in drop for m in model.blocks[i].modules()}
    if any(id(m) in dropped for m in per_layer):
        raise EffVisionError(f"prune layers: a per-layer ratio names a layer of a dropped block ({drop})")
    return [i for i in range(n) if i not in drop]


def _fix_attention(model: nn.Module, pruner: tp.pruner.MetaPruner) -> None:
    """Torch-Pruning removes whole heads from qkv/proj but does not tell timm's Attention."""
    for m in model.modules():
        if type(m) is Attention:
            m.num_heads = pruner.num_heads.get(m.qkv, m.num_heads)
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            m.attn_dim = m.num_heads * m.head_dim  # head_dim (and so scale) is unchanged


def _fix_root_sizes(model: nn.Module, example: torch.Tensor) -> None:
    """Size attributes timm keeps on the model itself, read back from the pruned tensors."""
    if _is_vit(model):
        width = model.patch_embed.proj.out_channels if hasattr(model.patch_embed.proj, "out_channels") \
            else model.patch_embed.proj.out_features
        for name in ("embed_dim", "num_features", "head_hidden_size"):
            if hasattr(model, name):
                setattr(model, name, width)
        if hasattr(model.patch_embed, "proj") and hasattr(model.patch_embed, "embed_dim"):
            model.patch_embed.embed_dim = width
    with torch.no_grad():
        feats = model.forward_features(example[:1])
        pre = model.forward_head(feats, pre_logits=True)
    if not _is_vit(model) and hasattr(model, "num_features") and feats.ndim == 4:
        model.num_features = feats.shape[1]
    if hasattr(model, "head_hidden_size"):
        model.head_hidden_size = pre.shape[-1]
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and hasattr(model, "forward_intermediates"):
        try:
            maps = model.forward_intermediates(example[:1], intermediates_only=True)
        except Exception:  # some families do not implement it; their feature_info stays as timm made it
            return
        if len(maps) == len(info):
            for entry, t in zip(info, maps):
                if isinstance(entry, dict) and "num_chs" in entry:
                    entry["num_chs"] = t.shape[1] if t.ndim == 4 else t.shape[-1]


def _check_runs(model: nn.Module, example: torch.Tensor, out_shape: torch.Size) -> None:
    with torch.no_grad():
        out = model(example)
    if out.shape != out_shape:
        raise EffVisionError(f"no handler covers {_family(model)}: the pruned model's output changed shape "
                             f"{tuple(out_shape)} -> {tuple(out.shape)}")

