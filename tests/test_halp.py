"""HALP-style per-layer allocation under a latency budget: the knapsack solver on constructed
tables (no clock), the prune stage end to end with ``allocation: halp`` and its rerun from the
machine's table, and bad input."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from effvision.compress.halp import Layer, _fit, solve_knapsack
from effvision.config import parse
from effvision.errors import ConfigError
from effvision.compress.stages import PruneConfig

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


def test_allocation_meets_the_estimated_budget_on_a_constructed_table() -> None:
    """Four blocks of a ViT with 3 heads and 192 MLP units; what the table says each width costs."""
    layers = []
    for b in range(4):
        layers.append(Layer(f"blocks.{b}.attn", "heads", 96, 3, [1, 2, 3]))
        layers.append(Layer(f"blocks.{b}.mlp.fc1", "mlp", 96, 192, [32, 64, 96, 128, 160, 192]))
    lat = {"model": 30.0, "heads:96:1": 1.6, "heads:96:2": 2.8, "heads:96:3": 3.9,
           **{f"mlp:96:{w}": 0.5 + 0.012 * w for w in (32, 64, 96, 128, 160, 192)}}
    # block 0 matters most, its heads above all; the later blocks' MLPs matter little
    values = {}
    for b in range(4):
        values[f"blocks.{b}.attn"] = [v * (4 - b) for v in (3.0, 5.0, 6.0)]
        values[f"blocks.{b}.mlp.fc1"] = [w / 192 * (1.0 if b == 0 else 0.3) for w in (32, 64, 96, 128, 160, 192)]
    def value(widths: list[int]) -> float:
        return sum(values[l.name][l.widths.index(w)] for l, w in zip(layers, widths))

    for target in (0.5, 0.6, 0.7):
        widths, estimate = _fit(layers, lat, values, target)
        assert estimate <= target
        assert _fit(layers, lat, values, target) == (widths, estimate)  # a pure function of the table
        heads, units = widths[0::2], widths[1::2]
        assert heads == sorted(heads, reverse=True) and units[0] >= units[3]  # the important blocks keep more
    assert _fit(layers, lat, values, 0.7)[0][0] == 3
    # at the estimated latency of a uniform choice (2 of 3 heads, half the units everywhere) it keeps more
    uniform = [2, 96] * 4
    dense_layers = sum(lat[f"{l.kind}:96:{l.full}"] for l in layers)
    uniform_estimate = (lat["model"] - dense_layers + sum(lat[f"{l.kind}:96:{w}"] for l, w in zip(layers, uniform))) \
        / lat["model"]
    widths, estimate = _fit(layers, lat, values, uniform_estimate)
    assert estimate <= uniform_estimate and value(widths) > value(uniform)
    assert _fit(layers, lat, values, 0.05) is None  # the layers alone cannot remove 95%


def test_prune_stage_halp_end_to_end_and_rerun_reads_the_table(tmp_path: Path) -> None:
    prune = {"type": "prune", "criterion": "taylor", "calib_batches": 1, "round_to": 8, "budget_kinds": ["heads", "mlp"],
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
     "allocation halp allocates heads and mlp per block, not width, channels; set budget_kinds: [heads, mlp]"),
], ids=["value", "metric", "kinds"])
def test_bad_halp_config(prune: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="allocation") as err:
        parse(PruneConfig, {"type": "prune", **prune}, "stages[1]")
    assert message in str(err.value) and "\n" not in str(err.value)
