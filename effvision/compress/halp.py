"""Per-layer pruning under a latency budget: HALP's latency-saliency knapsack (Shen et al.,
"Structural Pruning via Latency-Saliency Knapsack", NeurIPS 2022), for timm ViTs.

A uniform ratio removes the same share of every block's heads and MLP units. Here the allocation
chooses one embedding width for the whole model (kind ``width``, the ViT's residual stream) and,
per block, how many heads its attention keeps and how many hidden units its MLP keeps, or drops
the block whole (kind ``depth``: the block becomes the identity on the residual stream). Each block
is one knapsack item whose options are its (heads, units) pairs, plus "dropped" under ``depth``. A
block keeps both branches or neither: a lone branch at 0 would need a new module type in the saved
record and is rarely worth it (the other branch still pays the block's norms and its call), so the
only zero is the whole block. Every option has

- a **value**: the importance it keeps, the criterion's scores (``importance.py``: taylor, l2, ...)
  on the raw scale (no per-layer normalisation; a group's members summed, not averaged, so a
  channel of the embedding width, whose group spans every layer, compares with a head). Each
  tensor slice counts once (``Values``): a block's heads and units cover all its weights, so a
  dropped block keeps 0; a stream W wide keeps its W best channels (ranked on the dense model) and
  loses, besides the patch embedding/tokens/norm/head slices of the others, each *kept* block's
  slices of them (a block's share of a channel's score: what the score loses when that block's
  tensors read 0). The one slice counted twice is a removed head's (unit's) weights on a removed
  channel: the loss of narrowing both is slightly overstated.
- a **cost**: its measured latency, read from a per-machine table of layer widths (one block's
  norm + attention with h heads, norm + MLP with m units, at every embedding width offered, at the
  model's token count and batch, on the budget's backend; a dropped block costs 0), timed
  round-robin (every variant and the whole dense model called in turn, medians), cached like
  ``budget.LatencyTable`` so that a rerun reads the table.

For each embedding width the blocks are solved as a knapsack with that width's costs and values
(at least one block kept), and the width whose total kept value is largest wins: every total is
on the one scale above, so widths compare. Then the pruned model's whole latency is measured
against dense (``latency_fraction``) and the layers' share is rescaled if the sum of layer
latencies mispredicted it (fusions across layers, call overhead, the patch embedding and head,
which the table keeps at their dense cost).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp
from timm.layers import Mlp
from timm.layers.attention import Attention

from ..bench import time_calls
from ..errors import EffVisionError
from .budget import BudgetSpec, LatencyTable, _runner, latency_fraction
from .importance import get_criterion
from .prune import Batches, PruneSpec, _is_vit, kinds_of, prune_

__all__ = ["Layer", "Block", "Allocation", "HALP_KINDS", "DEPTH", "blocks_of", "embed_widths", "present_kinds",
           "Values", "solve_knapsack", "layer_latencies", "layer_values", "allocate", "round_robin",
           "round_robin_times"]

DEPTH = "depth"    # a budget kind of HALP only: whole ViT blocks dropped
HALP_KINDS = ("heads", "mlp", "width", DEPTH)
TOLERANCE = 0.03   # accept a measured fraction this far under the budget; closer is not worth more tries


@dataclass
class Layer:
    """A block's attention (width = heads) or MLP (width = hidden units)."""

    name: str            # the module pruned: "blocks.0.attn" (heads) or "blocks.0.mlp.fc1" (units)
    kind: str            # heads | mlp
    dim: int             # the block's dense input width
    full: int            # the dense width
    widths: list[int]    # the widths it may keep, ascending (the last is ``full``; only it when not allocated)


@dataclass
class Block:
    """One knapsack item: a block's layers, each at one of its widths, or (``index`` set) dropped whole."""

    name: str                 # the layers' parent: "blocks.0"
    layers: list[Layer]
    index: int | None = None  # its position in ``model.blocks`` when it may be dropped (kind depth)

    def options(self) -> list[tuple[int, ...]]:
        """Every choice as a width per layer; all zeros (last, so ties keep the block): dropped."""
        kept = list(itertools.product(*(l.widths for l in self.layers)))
        return kept + [(0,) * len(self.layers)] if self.index is not None else kept


@dataclass(frozen=True)
class Allocation:
    """What the knapsack chose: the embedding width (None: not allocated) and each block's widths."""

    embed: int | None
    widths: tuple[tuple[int, ...], ...]   # per block, per layer (``Block.layers``); all 0: dropped

    def key(self) -> str:
        return f"alloc:{self.embed}|" + ";".join(",".join(map(str, w)) for w in self.widths)

    def spec(self, blocks: list[Block], base: PruneSpec, full_embed: int | None) -> PruneSpec:
        """The prune spec that makes it: Torch-Pruning takes ratios; the small offset makes its ceil
        (heads) and int (units, channels) land on the exact count."""
        def ratio(full: int, w: int) -> float:
            return (full - w) / full - 1e-6
        layers = {l.name: ratio(l.full, w) for b, ws in zip(blocks, self.widths) if any(ws)
                  for l, w in zip(b.layers, ws) if w < l.full}
        narrower = full_embed and self.embed and self.embed < full_embed
        width = {"width": ratio(full_embed, self.embed)} if narrower else {}  # type: ignore[arg-type]
        drop = [b.index for b, ws in zip(blocks, self.widths) if not any(ws) and b.index is not None]
        return dataclasses.replace(base, ratios=width, layers=layers, drop_blocks=drop)


def _levels(full: int, kind: str, round_to: int | None, max_ratio: float) -> list[int]:
    """Widths a layer may keep: every head count; MLP units and embedding channels in about 16 steps,
    multiples of round_to."""
    least = max(1, math.ceil(full * (1 - max_ratio)))
    if kind == "heads":
        return list(range(least, full + 1))
    q = round_to or 1
    step = q * math.ceil(max(1, full // 16) / q)
    return sorted({full, *(w for w in range(step, full, step) if w >= least)})


def present_kinds(model: nn.Module, kinds: Sequence[str]) -> list[str]:
    """The kinds of ``kinds`` this model has (depth: a ViT with more than one block)."""
    found = kinds_of(model)
    return [k for k in kinds if (len(model.blocks) > 1 if k == DEPTH and _is_vit(model) else found.get(k))]


def embed_widths(model: nn.Module, kinds: Sequence[str], round_to: int | None, max_ratio: float) -> list[int | None]:
    """The embedding widths offered, ascending ([None]: width is not allocated)."""
    if "width" not in kinds or not kinds_of(model)["width"]:
        return [None]
    return _levels(model.embed_dim, "width", round_to, max_ratio)  # type: ignore[arg-type]


def blocks_of(model: nn.Module, kinds: Sequence[str], round_to: int | None, max_ratio: float) -> list[Block]:
    """Every timm Attention and Mlp, grouped by block; a kind not in ``kinds`` keeps its dense width."""
    names = {id(m): n for n, m in model.named_modules()}
    position = {n: i for i, n in enumerate(names.values())}
    found = kinds_of(model)
    layers = [Layer(names[id(a)], "heads", a.qkv.in_features, a.num_heads,
                    _levels(a.num_heads, "heads", None, max_ratio) if "heads" in kinds and a.num_heads > 1
                    else [a.num_heads]) for a in found["heads"]]
    layers += [Layer(names[id(f)], "mlp", f.in_features, f.out_features,
                     _levels(f.out_features, "mlp", round_to, max_ratio) if "mlp" in kinds else [f.out_features])
               for f in found["mlp"]]
    # "blocks.0.attn" and "blocks.0.mlp.fc1" belong to "blocks.0"
    parent = {l.name: l.name.rpartition(".")[0] if l.kind == "heads" else l.name.rsplit(".", 2)[0] for l in layers}
    droppable = {names[id(b)]: i for i, b in enumerate(model.blocks)} if DEPTH in kinds and _is_vit(model) else {}
    blocks = []
    for name in sorted({*parent.values()}, key=position.__getitem__):  # in model order
        mine = sorted((l for l in layers if parent[l.name] == name), key=lambda l: l.kind)  # heads, then mlp
        whole = [l.kind for l in mine] == ["heads", "mlp"]  # dropped only when both branches are modelled
        blocks.append(Block(name, mine, droppable.get(name) if whole else None))
    return blocks


# ---- the solver: a pure function of costs, values and capacity ------------------------------------

def solve_knapsack(costs: Sequence[Sequence[float]], values: Sequence[Sequence[float]], capacity: float,
                   bins: int = 2000) -> list[int] | None:
    """Pick one option per item, maximising the summed value with the summed cost <= ``capacity``.

    Dynamic programming over costs discretised into ``bins`` steps of capacity/bins, each cost
    rounded up (so a pick that fits in steps fits for real). DP rather than HALP's greedy
    value/cost ordering because it is exact for this multiple-choice form, where latency is not
    monotone or convex in width (a narrower layer can run slower: odd sizes miss fast kernels), and
    cheap at ViT sizes (one vector step per option: blocks x (heads x units + 1) x 2000). Ties keep
    the first option found, so the result is deterministic. Returns the option index per item, or
    None when nothing fits.
    """
    if capacity <= 0:
        return None
    unit = capacity / bins
    steps = [[math.ceil(c / unit - 1e-9) for c in item] for item in costs]
    best = np.zeros(bins + 1)          # best[c]: best value of the items so far within c steps
    picks: list[np.ndarray] = []
    for item_steps, item_values in zip(steps, values):
        new, pick = np.full(bins + 1, -np.inf), np.full(bins + 1, -1)
        for o, (s, v) in enumerate(zip(item_steps, item_values)):
            if s > bins:
                continue
            cand = np.full(bins + 1, -np.inf)
            cand[s:] = best[:bins + 1 - s] + v
            better = cand > new        # strictly: the first option reaching the best value stays
            new[better], pick[better] = cand[better], o
        best = new
        picks.append(pick)
    if best[bins] == -np.inf:
        return None
    chosen, c = [], bins
    for item_steps, pick in zip(reversed(steps), reversed(picks)):
        o = int(pick[c])
        chosen.append(o)
        c -= item_steps[o]
    return chosen[::-1]


def _solve_blocks(blocks: list[Block], costs: list[list[float]], values: list[list[float]],
                  capacity: float) -> list[int] | None:
    """``solve_knapsack`` over blocks, keeping at least one block: if the optimum drops them all, the
    best with each droppable block in turn forced kept (exact: one of them is kept in the optimum)."""
    picks = solve_knapsack(costs, values, capacity)
    if picks is None or any(b.index is None or o < len(c) - 1 for b, c, o in zip(blocks, costs, picks)):
        return picks
    found: tuple[float, list[int]] | None = None
    for k in range(len(blocks)):  # the dropped option is each block's last
        forced = solve_knapsack([c[:-1] if i == k else c for i, c in enumerate(costs)],
                                [v[:-1] if i == k else v for i, v in enumerate(values)], capacity)
        if forced is not None:
            total = sum(v[o] for v, o in zip(values, forced))
            if found is None or total > found[0]:
                found = (total, forced)
    return None if found is None else found[1]


# ---- the latency table of layer widths -------------------------------------------------------------

def round_robin_times(runners: dict[str, Callable[[], object]], cycles: int,
                      sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds of every call of each runner, called in turn ``cycles`` times (load hits all alike)."""
    for fn in runners.values():
        time_calls(fn, 3, 1, sync)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(cycles):
        for k, fn in runners.items():
            times[k].append(time_calls(fn, 0, 1, sync)[0])
    return times


def round_robin(runners: dict[str, Callable[[], object]], cycles: int,
                sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds per call of each runner (``round_robin_times``)."""
    return {k: statistics.median(v) for k, v in round_robin_times(runners, cycles, sync).items()}


def _entry(kind: str, dim: int, width: int) -> str:
    # blocks of equal size share entries: the table is of layer widths, not of layers
    return f"{kind}:{dim}:{width}"


def _variant(model: nn.Module, layer: Layer, width: int, dim: int) -> nn.Module:
    """One block's norm + attention with ``width`` heads, or norm + MLP with ``width`` units, on a
    stream ``dim`` wide."""
    module = model.get_submodule(layer.name)
    if layer.kind == "heads":
        assert isinstance(module, Attention)
        attn = Attention(dim, num_heads=width, attn_head_dim=module.head_dim, qkv_bias=module.qkv.bias is not None)
        return nn.Sequential(nn.LayerNorm(dim), attn)
    mlp = model.get_submodule(layer.name.rpartition(".")[0])
    act = type(mlp.act) if isinstance(mlp, Mlp) else nn.GELU
    return nn.Sequential(nn.LayerNorm(dim), Mlp(dim, width, act_layer=act))


def _entries(blocks: list[Block], embeds: list[int | None]) -> dict[str, tuple[Layer, int, int]]:
    """Every table entry the allocation needs: (layer, width, stream width) by name."""
    return {_entry(l.kind, e or l.dim, w): (l, w, e or l.dim)
            for e in embeds for b in blocks for l in b.layers for w in l.widths}


def layer_latencies(model: nn.Module, example: torch.Tensor, blocks: list[Block], embeds: list[int | None],
                    budget: BudgetSpec, cycles: int) -> dict[str, float]:
    """Seconds per call of every layer variant, at every embedding width, and of the whole model
    ("model"), round-robin."""
    with torch.no_grad():
        tokens = model.forward_features(example[:1]).shape  # (1, N, D): the blocks' input
    wanted = {k: _variant(model, l, w, d) for k, (l, w, d) in _entries(blocks, embeds).items()}
    shape = {k: (*tokens[:-1], d) for k, (_, _, d) in _entries(blocks, embeds).items()}
    dev = torch.device(budget.device if budget.backend == "torch" else "cpu")
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    with ExitStack() as stack:
        runners = {"model": _runner(model, tuple(example.shape), budget, stack)}
        runners.update({k: _runner(m, tuple(shape[k]), budget, stack) for k, m in wanted.items()})
        return round_robin(runners, cycles, sync)


# ---- values: the criterion's importance per head / unit / channel ----------------------------------

@dataclass
class Values:
    """The importance an allocation keeps, each tensor slice counted once: a block's heads and units
    cover all its attention and MLP weights (so a dropped block keeps 0), and a narrower stream
    removes the stem's slices of the dropped channels (patch embedding, tokens, norms, head) and each
    kept block's (its columns and rows of those channels)."""

    layers: dict[str, list[float]]                   # per layer: kept at each of its widths
    stem: dict[int | None, float]                    # per embedding width: kept outside the blocks
    stream_loss: dict[str, dict[int | None, float]]  # per block, per embedding width: its slices removed

    def of_blocks(self, blocks: list[Block], embed: int | None) -> list[list[float]]:
        """Each block's options' kept importance on a stream ``embed`` wide; a dropped block keeps none."""
        return [[sum(self.layers[l.name][l.widths.index(w)] for l, w in zip(b.layers, o))
                 - self.stream_loss[b.name][embed] if any(o) else 0.0 for o in b.options()] for b in blocks]

    def of(self, blocks: list[Block], alloc: Allocation) -> float:
        rows = self.of_blocks(blocks, alloc.embed)
        return self.stem[alloc.embed] + sum(v[b.options().index(w)] for b, v, w in zip(blocks, rows, alloc.widths))


def _kept(scores: torch.Tensor, widths: Sequence[int]) -> list[float]:
    ranked = torch.sort(scores, descending=True).values.cumsum(0)  # kept value of the best k
    return [float(ranked[w - 1]) for w in widths]


def layer_values(model: nn.Module, example: torch.Tensor, blocks: list[Block], embeds: list[int | None],
                 criterion: str, batches: Batches | None) -> Values:
    """The criterion's importance of every head, unit and embedding channel, as ``Values``."""
    crit = get_criterion(criterion)
    if crit.needs_data and not batches:
        raise EffVisionError(f"criterion '{criterion}' needs calibration batches")
    work = copy.deepcopy(model)
    imp = crit.build()
    if hasattr(imp, "normalizer"):
        imp.normalizer = None  # Torch-Pruning divides each group by its mean: layers would not compare
    if hasattr(imp, "group_reduction"):
        imp.group_reduction = "sum"  # its default "mean" divides by the group's member count (width: every layer)
    if crit.calibrate is not None:
        work.train()
        crit.calibrate(work, imp, batches or [])
    work.eval()
    graph = tp.DependencyGraph().build_dependency(work, example_inputs=example)

    def scores(root: nn.Module, name: str) -> torch.Tensor:
        out = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
        fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
        got = imp(graph.get_pruning_group(root, fn, idxs=list(range(out))))  # one score per output channel
        if got is None:
            raise EffVisionError(f"criterion '{criterion}' gave no importance for {name}")
        return got.detach().float()

    layers: dict[str, list[float]] = {}
    for layer in (l for b in blocks for l in b.layers):
        module = work.get_submodule(layer.name)
        if layer.kind == "heads":  # Torch-Pruning ranks heads by contiguous chunks of the group's scores; so do we
            layers[layer.name] = _kept(scores(module.qkv, layer.name).view(layer.full, -1).sum(1), layer.widths)
        else:
            layers[layer.name] = _kept(scores(module, layer.name), layer.widths)
    if embeds == [None]:
        return Values(layers, {None: 0.0}, {b.name: {None: 0.0} for b in blocks})
    root = kinds_of(work)["width"][0]  # the patch embedding's projection roots the residual stream's group
    total = scores(root, "the embedding width")
    shares = {}
    for b in blocks:  # a block's share of each channel's score: the score lost when its tensors read 0
        params = list(work.get_submodule(b.name).parameters())
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for q in params:
                q.zero_()
            shares[b.name] = total - scores(root, "the embedding width")
            for q, v in zip(params, saved):
                q.copy_(v)
    order = torch.argsort(total, descending=True)  # the channels a width W keeps: the W best of the dense model
    stem = total - sum(shares.values())
    return Values(layers, {e: float(stem[order[:e]].sum()) for e in embeds},  # type: ignore[misc]
                  {n: {e: float(share[order[e:]].sum()) for e in embeds} for n, share in shares.items()})


# ---- the allocation ---------------------------------------------------------------------------------

def _costs(blocks: list[Block], lat: dict[str, float], embed: int | None) -> list[list[float]]:
    """Each block's options' latency on a stream ``embed`` wide; a dropped block costs 0."""
    return [[sum(lat[_entry(l.kind, embed or l.dim, w)] for l, w in zip(b.layers, o)) if any(o) else 0.0
             for o in b.options()] for b in blocks]


def _dense(blocks: list[Block], embeds: list[int | None]) -> Allocation:
    return Allocation(embeds[-1], tuple(tuple(l.full for l in b.layers) for b in blocks))


def _estimate(blocks: list[Block], lat: dict[str, float], alloc: Allocation, dense: Allocation) -> float:
    """The model's latency over dense if only its blocks' latency changed (the table's sum)."""
    cost = {a: sum(c[b.options().index(w)] for b, c, w in zip(blocks, _costs(blocks, lat, a.embed), a.widths))
            for a in (alloc, dense)}
    return (lat["model"] - cost[dense] + cost[alloc]) / lat["model"]


def _fit(blocks: list[Block], embeds: list[int | None], lat: dict[str, float], values: Values,
         target: float) -> tuple[Allocation, float] | None:
    """The allocation of most kept value whose summed layer latency brings the estimated model latency
    to ``target`` of dense: a knapsack over the blocks at each embedding width, the best width kept."""
    dense = _dense(blocks, embeds)
    capacity = sum(c[b.options().index(w)] for b, c, w in zip(blocks, _costs(blocks, lat, dense.embed), dense.widths)) \
        - (1 - target) * lat["model"]
    best: tuple[float, Allocation] | None = None
    for embed in reversed(embeds):  # widest first: ties keep the wider stream
        rows = values.of_blocks(blocks, embed)
        picks = _solve_blocks(blocks, _costs(blocks, lat, embed), rows, capacity)
        if picks is None:
            continue
        total = values.stem[embed] + sum(v[o] for v, o in zip(rows, picks))
        if best is None or total > best[0]:
            best = (total, Allocation(embed, tuple(b.options()[o] for b, o in zip(blocks, picks))))
    return None if best is None else (best[1], _estimate(blocks, lat, best[1], dense))


def _narrowest(blocks: list[Block], embeds: list[int | None], values: Values) -> Allocation:
    """The fastest allocation offered: the narrowest stream and layers, every droppable block dropped
    but the one keeping the most importance there."""
    narrow = [tuple(l.widths[0] for l in b.layers) for b in blocks]
    rows = values.of_blocks(blocks, embeds[0])
    keep = max((i for i, b in enumerate(blocks) if b.index is not None),
               key=lambda i: rows[i][blocks[i].options().index(narrow[i])], default=None)
    return Allocation(embeds[0], tuple(w if b.index is None or i == keep else (0,) * len(w)
                                       for i, (b, w) in enumerate(zip(blocks, narrow))))


def _report_widths(blocks: list[Block], alloc: Allocation) -> dict[str, Any]:
    """The widths chosen: per dense block (or "dropped"), and per layer of the pruned model (dropped
    blocks gone, the kept ones renumbered as ``model.blocks`` is)."""
    dropped = [b.index for b, ws in zip(blocks, alloc.widths) if not any(ws)]

    def renamed(name: str) -> str:  # "blocks.3.attn" -> "blocks.2.attn" when block 1 is dropped
        head, _, rest = name.partition(".")
        i, _, rest = rest.partition(".")
        return f"blocks.{int(i) - sum(d < int(i) for d in dropped)}.{rest}" if dropped and head == "blocks" else name
    return {"embed_dim": alloc.embed,
            "block_widths": {b.name: dict(zip((l.kind for l in b.layers), ws)) if any(ws) else "dropped"
                             for b, ws in zip(blocks, alloc.widths)},
            "dropped_blocks": dropped,
            "layer_widths": {renamed(l.name): w for b, ws in zip(blocks, alloc.widths)
                             for l, w in zip(b.layers, ws) if w}}


def allocate(model: nn.Module, example: torch.Tensor, kinds: Sequence[str], budget: BudgetSpec, base: PruneSpec,
             batches: Batches | None, max_ratio: float, table: LatencyTable,
             tries: int = 5) -> tuple[PruneSpec, dict[str, Any]]:
    """``base`` with the embedding width, per-layer ratios and dropped blocks (``PruneSpec.ratios``,
    ``layers``, ``drop_blocks``) meeting ``budget.fraction`` of dense latency, and a report.

    ``table`` (``LatencyTable.for_search`` with ``allocation: halp``) holds the layer latencies and
    every measured allocation's fraction: a rerun on the same machine reads it and returns the same widths.
    """
    blocks = blocks_of(model, kinds, base.round_to, max_ratio)
    embeds = embed_widths(model, kinds, base.round_to, max_ratio)
    if not any(len(b.options()) > 1 for b in blocks) and embeds == [None]:
        raise EffVisionError(f"allocation halp: {type(model).__name__} has no timm Attention (with > 1 head), Mlp, "
                             f"ViT width or block to allocate")
    full_embed, dense = embeds[-1], _dense(blocks, embeds)
    keys = {"model", *_entries(blocks, embeds)}
    if not keys <= set(table.entries):
        table.update(layer_latencies(model, example, blocks, embeds, budget, budget.rounds * budget.iters))
    lat = {k: table.entries[k] for k in keys}
    values = layer_values(model, example, blocks, embeds, base.criterion, batches)

    def kept(alloc: Allocation) -> float:
        return values.of(blocks, alloc) / values.of(blocks, dense)

    def measured(alloc: Allocation) -> float:
        spec = alloc.spec(blocks, dataclasses.replace(base, criterion="l1", steps=1), full_embed)
        if not (spec.ratios or spec.layers or spec.drop_blocks):
            return 1.0

        def run() -> float:
            trial = copy.deepcopy(model)
            prune_(trial, spec, example)
            return latency_fraction(trial, model, example, budget)
        return table.lookup(alloc.key(), run)

    # The layer sum mispredicts the whole model (fusions across layers, call overhead: a 4-block ViT
    # measured 0.46 where the table said 0.55), so the knapsack's target is calibrated on measurements:
    # the narrowest model anchors the scale of the savings (dense is 1.0 on both scales), then the
    # savings are rescaled by the measured miss until one target over and one under the budget are
    # known, and bisected between them.
    narrowest = _narrowest(blocks, embeds, values)
    floor = _estimate(blocks, lat, narrowest, dense)
    least = measured(narrowest)
    if least > budget.fraction:
        raise EffVisionError(f"budget latency <= {budget.fraction:.0%} of dense cannot be reached by allocation halp: "
                             f"every layer at its narrowest (max_ratio {max_ratio}) measures {least:.0%}")
    scale = (1 - least) / max(1 - floor, 1e-9)   # measured saving per estimated saving
    target = max(1 - (1 - budget.fraction) / scale, floor)
    trials: list[dict[str, Any]] = []
    best: tuple[Allocation, float, float] | None = None
    under, over = None, None
    for _ in range(tries):
        fit = _fit(blocks, embeds, lat, values, target)
        alloc, estimate = fit if fit is not None else (narrowest, floor)
        got = measured(alloc)
        trials.append({"target": round(target, 4), "estimated": round(estimate, 4), "measured": round(got, 4),
                       "kept_importance": round(kept(alloc), 4), "embed": alloc.embed,
                       "widths": [list(w) for w in alloc.widths]})
        if got <= budget.fraction and (best is None or kept(alloc) > best[1]):
            best = (alloc, kept(alloc), got)
        if budget.fraction - TOLERANCE <= got <= budget.fraction:
            break
        if got <= budget.fraction:
            under = target if under is None else max(under, target)
        else:
            over = target if over is None else min(over, target)
        target = (under + over) / 2 if under is not None and over is not None \
            else 1 - (1 - target) * (1 - budget.fraction) / max(1 - got, 1e-3)  # rescale the savings
    if best is None:  # measured again over the budget every time: the narrowest model is known to meet it
        best = (narrowest, kept(narrowest), least)
    alloc, share, got = best
    report = {"allocation": "halp", **_report_widths(blocks, alloc), "halp_fraction": got, "kept_importance": share,
              "halp_trials": trials,
              "halp_calibration": {"narrowest_estimated": round(floor, 4), "narrowest_measured": round(least, 4)},
              "layer_latency_ms": {k: round(v * 1e3, 4) for k, v in sorted(lat.items())}}
    return alloc.spec(blocks, base, full_embed), report
