"""Function-preserving growth (effvision.assemble.grow) and the grow stage."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import cli, tiny_recipe
from effvision.assemble import GrowConfig, grow_model
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


@pytest.mark.slow
def test_grow_stage_keeps_training(tmp_path: Path) -> None:
    """train (1 block) -> grow (2 blocks, width x2) -> train: the grown model starts where the small
    one ended and its loss keeps falling."""
    train = {"type": "train", "epochs": 2, "optimizer": {"name": "adamw", "lr": 2.0e-3},
             "scheduler": {"name": "cosine", "warmup_epochs": 0}, "log_every": 2, "eval_every": 2}
    recipe = tiny_recipe(tmp_path / "r.yaml", model={"kwargs": {"depth": 1}}, data={"limit_train": 256, "limit_eval": 64},
                         stages=[train, {"type": "grow", "depth": 2, "width": 2}, {**train, "epochs": 3}])
    r = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    grow = json.loads((tmp_path / "run" / "02-grow" / "summary.json").read_text())
    assert grow["depth"] == [1, 2] and grow["embed_dim"] == [96, 192] and grow["max_abs_output_change"] < 1e-5
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
