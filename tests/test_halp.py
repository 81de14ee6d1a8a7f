"""HALP-style allocation under a latency budget (heads, MLP units, embedding width, depth): the
knapsack solver and the allocation against brute-force enumeration on constructed tables (no clock),
the importance values against l1 by hand, a width- and depth-pruned ViT through save/load and ONNX,
the prune stage end to end with ``allocation: halp`` and its rerun from the machine's table, and bad
input."""
from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch_pruning as tp

import effvision  # noqa: F401  (registers effvision's own models)
from effvision.compress.halp import Allocation, Block, Layer, Values, _fit, blocks_of, embed_widths, layer_values, \
    solve_knapsack
from effvision.compress.prune import PruneSpec, prune_
from effvision.compress.stages import PruneConfig
from effvision.config import parse
from effvision.errors import ConfigError, EffVisionError
from effvision.export import OnnxExportConfig, check_parity, export_onnx
from effvision.models.io import ModelSpec, create_model, load_model, save_model
from effvision.models.modes import record_of

from conftest import cli, tiny_recipe


def _brute(costs: list[list[float]], values: list[list[float]], capacity: float) -> float:
    best = -1.0
    for picks in itertools.product(*(range(len(c)) for c in costs)):
        if sum(c[o] for c, o in zip(costs, picks)) <= capacity:
            best = max(best, sum(v[o] for v, o in zip(values, picks)))
    return best


def test_knapsack_is_optimal_within_capacity_and_deterministic() -> None:
    # latency is not monotone in width (item 1: its middle option is slower than its widest)
    costs = [[1, 3, 2], [2, 4, 5, 7], [1, 2, 6], [3, 3, 8]]
    values = [[1.0, 2.0, 2.5], [0.5, 2.0, 2.2, 4.0], [0.1, 0.9, 3.0], [1.0, 1.1, 5.0]]
    for capacity in (7, 10, 13, 17, 22):
        picks = solve_knapsack(costs, values, capacity, bins=capacity)  # integer costs: exact
        assert picks is not None
        assert sum(c[o] for c, o in zip(costs, picks)) <= capacity
        assert sum(v[o] for v, o in zip(values, picks)) == pytest.approx(_brute(costs, values, capacity))
        assert solve_knapsack(costs, values, capacity, bins=capacity) == picks
    assert solve_knapsack(costs, values, 6) is None   # the cheapest picks cost 7
    # non-integer costs, fine bins: never over capacity (costs round up)
    picks = solve_knapsack([[0.13, 0.31], [0.27, 0.52]], [[1, 2], [1, 3]], 0.70)
    assert picks == [0, 1]
    # two wide options of 0.50024 each: 1000.48 steps of capacity/2000. Rounded up (1001 + 1001 >
    # 2000) they do not fit together, as for real (1.00048 > 1); rounded down or to nearest
    # (1000 + 1000) the DP would pick both, over capacity.
    costs, values = [[0.1, 0.50024], [0.1, 0.50024]], [[0.0, 1.0], [0.0, 1.0]]
    picks = solve_knapsack(costs, values, 1.0)
    assert picks in ([0, 1], [1, 0]) and _brute(costs, values, 1.0) == 1.0


# Three droppable blocks (heads 1..2, units 8 or 16) on a stream 32 or 64 wide; integer costs and
# capacities k + 0.5 (none of the sums lands near one), so the discretised DP is exact here.
EMBEDS = [32, 64]
TABLE = {"model": 100.0, "heads:64:1": 4.0, "heads:64:2": 6.0, "mlp:64:8": 3.0, "mlp:64:16": 4.0,
         "heads:32:1": 3.0, "heads:32:2": 4.0, "mlp:32:8": 1.0, "mlp:32:16": 2.0}


def _blocks() -> list[Block]:
    return [Block(f"blocks.{i}", [Layer(f"blocks.{i}.attn", "heads", 64, 2, [1, 2]),
                                  Layer(f"blocks.{i}.mlp.fc1", "mlp", 64, 16, [8, 16])], index=i) for i in range(3)]


def _values(stream_loss: float) -> Values:
    """Block 0 matters most, block 2 least; the narrow stream loses ``stream_loss`` per kept block."""
    layers = {}
    for i, weight in enumerate((5.0, 2.0, 0.6)):
        layers[f"blocks.{i}.attn"] = [weight * 2, weight * 3]
        layers[f"blocks.{i}.mlp.fc1"] = [weight, weight * 1.5]
    return Values(layers, {32: 4.0, 64: 5.0}, {f"blocks.{i}": {32: stream_loss, 64: 0.0} for i in range(3)})


def _brute_fit(blocks: list[Block], values: Values, target: float) -> float:
    """The best kept value by enumeration of every stream width and block choice (one block at least)."""
    dense = sum(TABLE[f"{l.kind}:64:{l.full}"] for b in blocks for l in b.layers)
    best = -1.0
    for embed in EMBEDS:
        for choice in itertools.product(*(b.options() for b in blocks)):
            if not any(any(w) for w in choice):
                continue
            cost = sum(TABLE[f"{l.kind}:{embed}:{w}"] for b, ws in zip(blocks, choice)
                       for l, w in zip(b.layers, ws) if w)
            if (TABLE["model"] - dense + cost) / TABLE["model"] <= target:
                kept = values.stem[embed] + sum(
                    sum(values.layers[l.name][l.widths.index(w)] for l, w in zip(b.layers, ws))
                    - values.stream_loss[b.name][embed] for b, ws in zip(blocks, choice) if any(ws))
                best = max(best, kept)
    return best


@pytest.mark.parametrize("stream_loss", [0.3, 4.0], ids=["narrow-cheap", "narrow-costly"])
def test_fit_is_the_brute_force_optimum_over_width_and_depth(stream_loss: float) -> None:
    blocks, values = _blocks(), _values(stream_loss)
    for capacity in (4.5, 5.5, 7.5, 10.5, 15.5, 20.5, 29.5):  # dense blocks cost 30 on the model's 100
        target = 1 - (30 - capacity) / 100
        alloc, estimate = _fit(blocks, EMBEDS, TABLE, values, target)
        assert estimate <= target
        assert values.of(blocks, alloc) == pytest.approx(_brute_fit(blocks, values, target))
        assert any(any(w) for w in alloc.widths)  # a model keeps a block
        assert _fit(blocks, EMBEDS, TABLE, values, target) == (alloc, estimate)  # a pure function of the table


def test_a_tight_budget_drops_blocks_and_narrows_the_stream() -> None:
    blocks, values = _blocks(), _values(0.3)
    loose, _ = _fit(blocks, EMBEDS, TABLE, values, 1.01)  # costs round up to the DP's bins: dense needs a margin
    assert loose == Allocation(64, ((2, 16),) * 3)  # everything fits: nothing is pruned
    tight, estimate = _fit(blocks, EMBEDS, TABLE, values, 1 - (30 - 4.5) / 100)
    assert tight.embed == 32 and (0, 0) in tight.widths and estimate <= 1 - (30 - 4.5) / 100
    assert tight.widths[0] != (0, 0)  # the most important block stays
    # the prune spec it makes: the stream's ratio, per-layer ratios of kept blocks, the dropped blocks
    spec = tight.spec(blocks, PruneSpec(criterion="l2"), 64)
    assert spec.drop_blocks == [i for i, w in enumerate(tight.widths) if w == (0, 0)]
    assert round(64 * (1 - spec.ratios["width"])) == 32 and spec.criterion == "l2"
    assert not any(n.startswith(f"blocks.{i}.") for i in spec.drop_blocks for n in spec.layers)
    assert _fit(blocks, EMBEDS, TABLE, values, 1 - (30 - 0.5) / 100) is None  # one block at its narrowest costs 4


def test_values_count_a_block_s_stream_slices_as_l1_by_hand() -> None:
    """l1: a block's share of an embedding channel is the summed |w| of its tensors' slices of it."""
    warnings.filterwarnings("ignore", message="Unwrapped parameters")
    torch.manual_seed(0)
    model = timm.create_model("vit_micro_patch4_32", img_size=16, num_classes=10)
    x = torch.randn(2, 3, 16, 16)
    blocks = blocks_of(model, ["heads", "mlp", "width", "depth"], 8, 0.9)
    embeds = embed_widths(model, ["width"], 8, 0.9)
    assert embeds[0] == 16 and embeds[-1] == 96 and all(e % 8 == 0 for e in embeds)
    values = layer_values(model, x, blocks, embeds, "l1", None)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = graph.get_pruning_group(model.patch_embed.proj, tp.prune_conv_out_channels, idxs=list(range(96)))
    order = torch.argsort(tp.importance.GroupMagnitudeImportance(p=1, normalizer=None, group_reduction="sum")(group),
                          descending=True)
    with torch.no_grad():
        for i, b in enumerate(model.blocks):
            a, m = b.attn, b.mlp
            share = (a.qkv.weight.abs().sum(0) + a.proj.weight.abs().sum(1) + a.proj.bias.abs()
                     + m.fc1.weight.abs().sum(0) + m.fc2.weight.abs().sum(1) + m.fc2.bias.abs()
                     + b.norm1.weight.abs() + b.norm1.bias.abs() + b.norm2.weight.abs() + b.norm2.bias.abs())
            for e in embeds:
                assert values.stream_loss[f"blocks.{i}"][e] == pytest.approx(float(share[order[e:]].sum()), rel=1e-5)
            # every head kept: all of qkv (weight, bias) and proj's weight, each slice once
            heads = a.qkv.weight.abs().sum() + a.qkv.bias.abs().sum() + a.proj.weight.abs().sum()
            assert values.layers[f"blocks.{i}.attn"][-1] == pytest.approx(float(heads), rel=1e-5)


def test_depth_and_width_pruned_vit_round_trips_and_exports(tmp_path: Path) -> None:
    warnings.filterwarnings("ignore", message="Unwrapped parameters")
    torch.manual_seed(0)
    spec = ModelSpec("vit_micro_patch4_32", kwargs={"img_size": 16}, img_size=16)
    model = create_model(spec)
    x = torch.randn(2, 3, 16, 16)
    blocks = blocks_of(model, ["heads", "mlp", "width", "depth"], 8, 0.9)
    alloc = Allocation(48, ((3, 128), (0, 0), (0, 0), (1, 64)))
    prune_(model, alloc.spec(blocks, PruneSpec(criterion="l2", round_to=8), 96), x)
    assert model.embed_dim == model.head.in_features == model.pos_embed.shape[-1] == 48
    assert [(b.attn.num_heads, b.mlp.fc1.out_features) for b in model.blocks] == [(3, 128), (1, 64)]
    assert [f["module"] for f in model.feature_info] == ["blocks.0", "blocks.1"]
    assert record_of(model)[-1]["metadata"]["kept_blocks"] == [0, 3]
    save_model(model, spec, tmp_path / "model")
    rebuilt, _ = load_model(tmp_path / "model")  # a fresh dense model: the record drops blocks 1, 2, then resizes
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    onnx = export_onnx(rebuilt, tmp_path / "m.onnx", (3, 16, 16), OnnxExportConfig())
    assert check_parity(rebuilt, onnx, (3, 16, 16), [2], 1e-4)["max_abs_error"] <= 1e-4


@pytest.mark.parametrize("drop,message", [
    ([4], "prune drop_blocks [4]: distinct indices of the 4 blocks, at least one kept"),
    ([0, 1, 2, 3], "at least one kept"),
    ([1, 1], "distinct indices"),
], ids=["range", "all", "repeated"])
def test_bad_drop_blocks(drop: list[int], message: str) -> None:
    model = timm.create_model("vit_micro_patch4_32", img_size=16, num_classes=10)
    with pytest.raises(EffVisionError, match="drop_blocks") as err:
        prune_(model, PruneSpec(drop_blocks=drop), torch.randn(2, 3, 16, 16))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert len(model.blocks) == 4  # refused before any change
    with pytest.raises(EffVisionError, match="dropped block"):
        prune_(model, PruneSpec(layers={"blocks.1.attn": 0.5}, drop_blocks=[1]), torch.randn(2, 3, 16, 16))


def test_prune_stage_halp_end_to_end_and_rerun_reads_the_table(tmp_path: Path) -> None:
    prune = {"type": "prune", "criterion": "taylor", "calib_batches": 1, "round_to": 8,
             "budget_kinds": ["heads", "mlp", "width", "depth"],
             "budget": {"metric": "latency", "backend": "torch", "fraction": 0.7, "allocation": "halp",
                        "batch_size": 16, "iters": 2, "rounds": 2}}
    recipe = tiny_recipe(tmp_path / "r.yaml", stages=[
        {"type": "train", "epochs": 1, "optimizer": {"name": "adamw", "lr": 2.0e-3}, "log_every": 4}, prune])
    env = {"EFFVISION_CACHE": str(tmp_path / "cache")}
    r = cli("run", str(recipe), "--out", str(tmp_path / "a"), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    first = json.loads((tmp_path / "a" / "02-prune" / "prune.json").read_text())
    assert first["allocation"] == "halp" and first["latency_table_reused"] is False
    assert first["halp_fraction"] <= 0.7 and Path(first["latency_table"]).is_file()
    assert first["widths"] == first["layer_widths"]  # the model has the allocated widths
    model, _ = load_model(tmp_path / "a" / "02-prune" / "model")  # the record replays width and depth
    assert model.embed_dim == first["embed_dim"] and len(model.blocks) == 4 - len(first["dropped_blocks"])
    assert all(w % 8 == 0 for n, w in first["widths"].items() if n.endswith("fc1"))
    assert first["pruned"]["macs"] < first["dense"]["macs"]
    # the same dense model pruned again: the table is read, the same architecture comes out
    again = tiny_recipe(tmp_path / "again.yaml", stages=[prune],
                        model={"init_from": str(tmp_path / "a" / "01-train" / "model")})
    r = cli("run", str(again), "--out", str(tmp_path / "b"), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    second = json.loads((tmp_path / "b" / "01-prune" / "prune.json").read_text())
    assert second["latency_table_reused"] is True
    assert second["layer_widths"] == first["layer_widths"] and second["halp_trials"] == first["halp_trials"]


@pytest.mark.parametrize("prune,message", [
    ({"budget": {"metric": "latency", "fraction": 0.5, "allocation": "knapsack"}, "budget_kinds": ["heads", "mlp"]},
     "stages[1].budget.allocation: 'knapsack' is not one of 'uniform', 'halp'"),
    ({"budget": {"metric": "macs", "fraction": 0.5, "allocation": "halp"}, "budget_kinds": ["heads", "mlp"]},
     "halp allocates measured latency; use metric latency"),
    ({"budget": {"metric": "latency", "fraction": 0.5, "allocation": "halp"}},
     "allocation halp allocates heads, mlp, width, depth, not channels; set budget_kinds within [heads, mlp, width, "
     "depth]"),
    ({"budget": {"metric": "latency", "fraction": 0.5}, "budget_kinds": ["heads", "depth"]},
     "depth (whole blocks dropped) needs budget.allocation halp"),
], ids=["value", "metric", "kinds", "depth-uniform"])
def test_bad_halp_config(prune: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="allocation") as err:
        parse(PruneConfig, {"type": "prune", **prune}, "stages[1]")
    assert message in str(err.value) and "\n" not in str(err.value)
