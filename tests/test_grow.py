"""Function-preserving growth (effvision.assemble.grow) and the grow stage."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import cli, tiny_recipe
from effvision.assemble import GrowConfig, grow_model
from effvision.assemble.grow import grow_optimizer_state
from effvision.assemble.optimizer_state import (STATE_FILE, carry_optimizer_state, checkpoint_optimizer_state,
                                                param_order, save_optimizer_state)
from effvision.engine.checkpoint import Checkpointer, TrainPosition
from effvision.engine.optim import OptimizerConfig, create_optimizer
from effvision.errors import EffVisionError
from effvision.models.io import ModelSpec, create_model

CASES = [
    ("vit_micro_patch4_32", {"depth": 2}),
    ("vit_micro_patch4_32", {"depth": 2, "init_values": 1e-2, "qk_norm": True}),  # LayerScale, qk_norm
    ("convvit_tiny_32", {"depth": 1, "embed_dim": 48}),                          # conv tokenizer, mean pool
]


@pytest.mark.parametrize("name,kwargs", CASES)
@pytest.mark.parametrize("cfg", [GrowConfig(depth=4), GrowConfig(depth=3, position="end"), GrowConfig(width=2),
                                 GrowConfig(depth=4, width=2)], ids=["depth", "depth-end", "width", "both"])
def test_growth_preserves_the_function(name: str, kwargs: dict, cfg: GrowConfig) -> None:
    spec = ModelSpec(name=name, kwargs=kwargs)
    torch.manual_seed(0)
    model = create_model(spec).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    grown, new_spec = grow_model(model, spec, cfg)
    with torch.no_grad():
        after = grown.eval()(x)
    depth = cfg.depth or kwargs["depth"]
    assert len(grown.blocks) == depth and new_spec.kwargs["depth"] == depth
    assert grown.embed_dim == model.embed_dim * cfg.width
    assert grown.blocks[0].attn.num_heads == model.blocks[0].attn.num_heads * cfg.width
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    # a plain timm model again: the spec rebuilds it
    assert type(create_model(new_spec)) is type(model)


def test_width_copies_get_different_gradients() -> None:
    """The random split of outgoing weights breaks the symmetry between duplicated units."""
    spec = ModelSpec(name="vit_micro_patch4_32", kwargs={"depth": 1})
    grown, _ = grow_model(create_model(spec), spec, GrowConfig(width=2))
    grown(torch.randn(2, 3, 32, 32)).square().sum().backward()
    g = grown.blocks[0].mlp.fc1.weight.grad  # [2h, 2D]: rows h.. copy rows ..h
    h = g.shape[0] // 2
    assert not torch.allclose(g[:h], g[h:])


def test_growth_refuses_shrinking_and_other_widths() -> None:
    spec = ModelSpec(name="vit_micro_patch4_32", kwargs={"depth": 3})
    with pytest.raises(EffVisionError, match="shrink the model from 3 blocks"):
        grow_model(create_model(spec), spec, GrowConfig(depth=2))
    with pytest.raises(EffVisionError, match="width: 3 is not supported"):
        GrowConfig(width=3).validate("grow")


def _adamw_steps(model: torch.nn.Module, steps: int) -> torch.optim.Optimizer:
    opt = create_optimizer(model, OptimizerConfig(name="adamw", lr=1e-3))
    for i in range(steps):
        model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_optimizer_state_follows_growth(tmp_path: Path) -> None:
    """AdamW state read from a real checkpoint by name, mapped through depth and width growth and
    loaded into the grown model's optimizer: old blocks keep theirs, new blocks start fresh,
    duplicated units get duplicated moments."""
    spec = ModelSpec(name="vit_micro_patch4_32", kwargs={"depth": 2})
    torch.manual_seed(0)
    model = create_model(spec)
    opt = _adamw_steps(model, 2)
    Checkpointer(tmp_path / "01-train" / "checkpoints").save(model, None, {"optimizer": opt.state_dict()},
                                                              TrainPosition(1, 0, 2))
    named = checkpoint_optimizer_state(tmp_path / "01-train", model, OptimizerConfig(name="adamw", lr=1e-3))
    params = dict(model.named_parameters())
    assert set(named) == set(params)
    for name in ("blocks.1.mlp.fc1.weight", "pos_embed", "head.bias"):
        torch.testing.assert_close(named[name]["exp_avg"], opt.state[params[name]]["exp_avg"], rtol=0, atol=0)

    deep = grow_optimizer_state(named, model, GrowConfig(depth=4))  # interleave: old 0, 1 -> new 0, 2
    assert not any(k.startswith(("blocks.1.", "blocks.3.")) for k in deep)
    torch.testing.assert_close(deep["blocks.2.attn.qkv.weight"]["exp_avg_sq"], named["blocks.1.attn.qkv.weight"]["exp_avg_sq"])
    wide = grow_optimizer_state(named, model, GrowConfig(width=2))
    m = named["blocks.0.mlp.fc1.weight"]["exp_avg"]                    # [h, D]
    torch.testing.assert_close(wide["blocks.0.mlp.fc1.weight"]["exp_avg"], m.repeat(2, 2))  # [2h, 2D]
    torch.testing.assert_close(wide["norm.weight"]["exp_avg_sq"], named["norm.weight"]["exp_avg_sq"].repeat(2))
    head = named["head.weight"]["exp_avg"]                             # [C, D] -> [C, 2D]
    torch.testing.assert_close(wide["head.weight"]["exp_avg"], head.repeat(1, 2))
    assert float(wide["head.weight"]["step"]) == 2.0

    both = GrowConfig(depth=4, width=2)
    grown, _ = grow_model(model, spec, both)
    (tmp_path / "02-grow").mkdir()
    save_optimizer_state(grow_optimizer_state(named, model, both), tmp_path / "02-grow" / STATE_FILE)
    new_opt = create_optimizer(grown, OptimizerConfig(name="adamw", lr=1e-3))
    info = carry_optimizer_state(new_opt, grown, tmp_path / "02-grow" / "model")
    assert info["optimizer_state_carried"] == len(params)
    gp = dict(grown.named_parameters())
    torch.testing.assert_close(new_opt.state[gp["blocks.2.mlp.fc2.weight"]]["exp_avg"],
                               named["blocks.1.mlp.fc2.weight"]["exp_avg"].repeat(2, 2))
    grown(torch.randn(2, 3, 32, 32)).square().mean().backward()
    new_opt.step()  # the carried state fits the grown parameters
    assert float(new_opt.state[gp["blocks.2.mlp.fc2.weight"]]["step"]) == 3.0
    assert float(new_opt.state[gp["blocks.1.mlp.fc2.weight"]]["step"]) == 1.0  # an inserted block: fresh


def _checkpoint_steps(stage_dir: Path, recipe_model: ModelSpec) -> dict[str, float]:
    """Adam's per-parameter step counter in a stage's last checkpoint, by parameter name."""
    ckpt = Checkpointer(stage_dir / "checkpoints").latest()
    state = torch.load(ckpt / "state.pt", weights_only=True)["optimizer"]
    model = create_model(recipe_model)
    order = param_order(create_optimizer(model, OptimizerConfig(name="adamw", lr=1e-3)), model)
    ids = [i for g in state["param_groups"] for i in g["params"]]
    return {order[k]: float(state["state"][i]["step"]) for k, i in enumerate(ids)}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer_state", ["reset", "carry"])
def test_grow_stage_keeps_training(tmp_path: Path, optimizer_state: str) -> None:
    """train (1 block) -> grow (2 blocks, width x2) -> train: the grown model starts where the small
    one ended and its loss keeps falling; with carry the second train stage continues the first's
    AdamW state (old block: 8 + 12 steps) and the inserted block starts fresh (12 steps)."""
    train = {"type": "train", "epochs": 2, "optimizer": {"name": "adamw", "lr": 2.0e-3},
             "scheduler": {"name": "cosine", "warmup_epochs": 0}, "log_every": 2, "eval_every": 2}
    recipe = tiny_recipe(tmp_path / "r.yaml", model={"kwargs": {"depth": 1}}, data={"limit_train": 256, "limit_eval": 64},
                         stages=[train, {"type": "grow", "depth": 2, "width": 2, "optimizer_state": optimizer_state},
                                 {**train, "epochs": 3}])
    r = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    grow = json.loads((tmp_path / "run" / "02-grow" / "summary.json").read_text())
    assert grow["depth"] == [1, 2] and grow["embed_dim"] == [96, 192] and grow["max_abs_output_change"] < 1e-5
    summary = json.loads((tmp_path / "run" / "03-train" / "summary.json").read_text())
    steps = _checkpoint_steps(tmp_path / "run" / "03-train",
                              ModelSpec(name="vit_micro_patch4_32", kwargs={"depth": 2, "embed_dim": 192, "num_heads": 6}))
    if optimizer_state == "carry":
        assert summary["optimizer_state_carried"] == grow["optimizer_state_params"] > 0
        assert steps["blocks.0.mlp.fc1.weight"] == steps["head.weight"] == 8 + 12
    else:
        assert "optimizer_state_carried" not in summary and steps["blocks.0.mlp.fc1.weight"] == 12
    assert steps["blocks.1.mlp.fc1.weight"] == 12
    spec = json.loads((tmp_path / "run" / "03-train" / "model" / "model.json").read_text())
    assert spec["kwargs"]["depth"] == 2 and spec["kwargs"]["embed_dim"] == 192
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "03-train" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line) and not json.loads(line).get("eval")]
    n = len(losses) // 3
    assert sum(losses[-n:]) / n < sum(losses[:n]) / n, losses


def test_grow_stage_bad_input_fails_before_work(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "r.yaml", stages=[{"type": "train", "epochs": 1}, {"type": "grow", "depth": 2}])
    r = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "stages[1].depth: 2 would shrink the model from 4 blocks" in r.stderr
    assert not (tmp_path / "run").exists()
    train = {"type": "train", "epochs": 1}
    for stages, message in [
        ([train, {"type": "grow", "depth": 5, "optimizer_state": "carry"}, {"type": "eval"}],
         "stages[1].optimizer_state: carry needs a train stage right after the grow stage (found eval)"),
        ([train, {"type": "grow", "depth": 5, "optimizer_state": "carry"},
          {**train, "optimizer": {"name": "sgd", "lr": 0.1}}],
         "stages[1].optimizer_state: carry needs one optimizer on both sides of the grow stage (adamw before, sgd after)"),
    ]:
        recipe = tiny_recipe(tmp_path / "r.yaml", stages=stages)
        r = cli("run", str(recipe), "--out", str(tmp_path / "run"))
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "run").exists()
