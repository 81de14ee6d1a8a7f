"""Contextual sparsity: the gather path equals the masked reference (per image, batches where
images choose differently), recall on a constructed case, the stage in a recipe with a reload in
another process, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import effvision.models.small_vit  # noqa: F401
from effvision.dynamic.contextual import ContextualConfig, attach_predictors_, set_contextual_mode_
from effvision.dynamic.contextual_train import contextual_sparsity_, recall_at_k
from effvision.engine.evaluate import evaluate
from effvision.errors import ConfigError, EffVisionError
from effvision.models.io import load_model
from effvision.recipe import load_recipe
from effvision.engine.stage import build_recipe_loaders

from conftest import cli, tiny_recipe


def _run(model: torch.nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    set_contextual_mode_(model, mode)
    with torch.no_grad():
        return model(x)


# Tolerance: the gather path multiplies the same numbers in another order (bmm on gathered
# weights vs one GEMM with zeros), so fp32 rounding differs by a few ulps of the activations.
@pytest.mark.parametrize("name,kw", [("vit_micro_patch4_32", {"depth": 2}),
                                     ("deit_tiny_patch16_224", {"img_size": 48, "depth": 2, "qk_norm": True,
                                                                "init_values": 0.1})])
def test_gather_path_equals_masked_reference(name: str, kw: dict) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kw).eval()
    x = torch.randn(4, 3, kw.get("img_size", 32), kw.get("img_size", 32))
    dense = _run(model, x, "dense")
    attach_predictors_(model, ContextualConfig(head_keep=0.5, mlp_keep=0.3))  # random predictors: per-image choices
    torch.testing.assert_close(_run(model, x, "dense"), dense, rtol=0, atol=0)
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))                        # block 0's input
    picks = model.blocks[0].ctx_pred.neurons(model.blocks[0].norm1(tokens).mean(1))  # a proxy of its MLP input
    assert len({tuple(sorted(r.topk(model.blocks[0].mlp_k).indices.tolist())) for r in picks}) > 1
    masked, sparse = _run(model, x, "masked"), _run(model, x, "sparse")
    torch.testing.assert_close(sparse, masked, rtol=1e-5, atol=1e-5)
    assert (sparse - dense).abs().max() > 1e-3  # heads and neurons really were left out
    per_image = torch.cat([_run(model, x[i:i + 1], "sparse") for i in range(len(x))])
    torch.testing.assert_close(per_image, sparse, rtol=1e-5, atol=1e-5)
    full = attach_predictors_(timm.create_model(name, num_classes=10, **kw).eval(), ContextualConfig(1.0, 1.0))
    full.load_state_dict(model.state_dict())
    torch.testing.assert_close(_run(full, x, "sparse"), dense, rtol=1e-5, atol=1e-5)  # keep 1: dense


def test_recall_on_a_constructed_case() -> None:
    oracle = torch.tensor([[9.0, 8.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], [5.0, 0.0, 0.0, 4.0]])
    pred = torch.tensor([[0.0, 5.0, 4.0, 1.0], [3.0, 2.0, 1.0, 0.0], [1.0, 0.0, 0.0, 2.0]])
    # top-2 sets: oracle {0,1} {2,3} {0,3}; predicted {1,2} {0,1} {0,3}
    assert recall_at_k(pred, oracle, 2).tolist() == [0.5, 0.0, 1.0]
    assert recall_at_k(pred, oracle, 4).tolist() == [1.0, 1.0, 1.0]


def test_stage_trains_reports_and_reloads(tmp_path: Path) -> None:
    stages = [{"type": "train", "epochs": 1, "log_every": 4, "optimizer": {"name": "adamw", "lr": 2.0e-3}},
              {"type": "contextual_sparsity", "head_keep": 0.67, "mlp_keep": 0.5, "rank": 8, "steps": 30,
               "calib_batches": 2, "recall_batches": 1, "latency_batch_sizes": [1], "latency_iters": 2}]
    recipe = tiny_recipe(tmp_path / "r.yaml", stages=stages, model={"kwargs": {"depth": 2}},
                         data={"limit_train": 128, "limit_eval": 64})
    r = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    stage = tmp_path / "run" / "02-contextual_sparsity"
    s = json.loads((stage / "summary.json").read_text())
    assert set(s["top1_by_mode"]) == {"dense", "oracle", "predicted"} and len(s["recall"]) == 2
    assert all(0.0 <= r["heads"] <= 1.0 and 0.0 <= r["neurons"] <= 1.0 for r in s["recall"])
    assert s["heads_kept"] == [2, 2] and s["neurons_kept"] == [96, 96] and s["macs"]["fraction"] < 1.0
    assert s["latency_cpu"][0]["batch_size"] == 1 and s["latency_cpu"][0]["sparse_ms_p50"] > 0
    assert any(".ctx_pred." in k for k in load_file(str(stage / "model" / "model.safetensors")))
    # The stage ran in its own process; this one rebuilds the model from spec + safetensors and
    # reproduces the stage's predicted-sparsity top-1 on the same test split.
    model, spec = load_model(stage / "model")
    entry = spec.modes[-1]
    assert entry["mode"] == "contextual_sparsity" and entry["metadata"] == {"rank": 8}
    assert (entry["config"]["head_keep"], entry["config"]["mlp_keep"]) == (0.67, 0.5)
    assert model.blocks[0].ctx_mode == "sparse"
    loaders = build_recipe_loaders(load_recipe(recipe), torch.device("cpu"))
    assert evaluate(model, loaders.eval, torch.device("cpu"), "off")["top1"] == pytest.approx(s["top1"])


def test_bad_input_one_line_before_any_change(tmp_path: Path) -> None:
    for kw, key in ((dict(head_keep=0.0), "head_keep"), (dict(mlp_keep=1.5), "mlp_keep"), (dict(rank=0), "rank")):
        with pytest.raises(ConfigError, match=f"contextual_sparsity.{key}: "):
            contextual_sparsity_(timm.create_model("vit_micro_patch4_32", depth=1), ContextualConfig(**kw), [])
    with pytest.raises(EffVisionError, match="no handler for ResNet"):
        contextual_sparsity_(timm.create_model("resnet10t", num_classes=2), ContextualConfig(), [])
    # Predictors trained on one model, offered to another of other width/heads/depth.
    from effvision.models.io import ModelSpec, save_model

    small = timm.create_model("vit_micro_patch4_32", depth=2)
    contextual_sparsity_(small, ContextualConfig(rank=4, steps=1), [torch.randn(2, 3, 32, 32)])
    save_model(small, ModelSpec("vit_micro_patch4_32", {"depth": 2}), tmp_path / "pred")
    other = timm.create_model("vit_tiny_patch4_32", depth=3)
    with pytest.raises(EffVisionError, match=r"trained for another model \(block 0: width 96 vs 192, .*depth 2 vs 3"):
        contextual_sparsity_(other, ContextualConfig(predictors=str(tmp_path / "pred")))
    assert type(other.blocks[0]).__name__ == "Block"  # untouched
    same = timm.create_model("vit_micro_patch4_32", depth=2)
    contextual_sparsity_(same, ContextualConfig(predictors=str(tmp_path / "pred")))  # the matching model loads them
    torch.testing.assert_close(same.blocks[1].ctx_pred.neurons[2].weight, small.blocks[1].ctx_pred.neurons[2].weight)
    # The CLI: exit 2, one line, no run dir.
    stage = {"type": "contextual_sparsity", "predictors": str(tmp_path / "pred")}
    bad = tiny_recipe(tmp_path / "bad.yaml", stages=[stage],
                      model={"kwargs": {"depth": 3}})
    r = cli("run", str(bad), "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "stages[0].predictors" in r.stderr and "depth 2 vs 3" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "bad").exists()


def _colour_images(n: int, seed: int) -> torch.Tensor:
    """Images of one random colour each plus noise: the colour decides which neurons and heads of
    a block fire, so the truly important set changes from image to image."""
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(n, 3, 1, 1, generator=g) + 0.5 * torch.randn(n, 3, 32, 32, generator=g)


@torch.no_grad()
def _reference_oracle(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Block 0 of a plain ViT written out: per image the predictors' inputs (mean normed block
    input, mean normed MLP input) and the true importance (a head's mean L2 norm of its output
    through proj, a neuron's mean |activation|)."""
    blk = model.blocks[0]
    attn, (B, C) = blk.attn, (x.shape[0], model.embed_dim)
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    h = blk.norm1(tokens)
    N, H, hd = h.shape[1], attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(h).reshape(B, N, 3, H, hd).unbind(2)                        # [B, N, H, hd]
    o = torch.einsum("bhij,bjhd->bihd", (torch.einsum("bihd,bjhd->bhij", q, k) * attn.scale).softmax(-1), v)
    per_head = torch.stack([o[:, :, j] @ attn.proj.weight[:, j * hd:(j + 1) * hd].T for j in range(H)], 1)
    m = blk.norm2(tokens + attn.proj(o.reshape(B, N, C)))
    return {"head_in": h.mean(1), "head_imp": per_head.norm(dim=-1).mean(-1),
            "mlp_in": m.mean(1), "mlp_imp": blk.mlp.act(blk.mlp.fc1(m)).abs().mean(1)}


def _recall(scores: torch.Tensor, importance: torch.Tensor, k: int) -> float:
    """Mean over images of |predicted top-k ∩ true top-k| / k."""
    hits = [len(set(p.tolist()) & set(t.tolist())) for p, t in zip(scores.topk(k).indices, importance.topk(k).indices)]
    return sum(hits) / (k * len(hits))


def test_trained_predictors_find_the_important_heads_and_neurons_on_held_out_images() -> None:
    """Where the important heads and neurons change with the image, predictors trained on
    calibration images recall most of the true top-k on other images: far above chance and
    clearly above the best input-blind guess (the top-k of the mean calibration importance),
    which is all that predictors fit to wrong labels (another image's, or the least important)
    can reach."""
    torch.manual_seed(0)
    model = timm.create_model("vit_micro_patch4_32", num_classes=10, depth=1).eval()
    calib, held = _colour_images(512, 1), _colour_images(256, 2)
    contextual_sparsity_(model, ContextualConfig(head_keep=0.34, mlp_keep=0.25, rank=32, steps=200), [calib])
    blk, ref, prior = model.blocks[0], _reference_oracle(model, held), _reference_oracle(model, calib)
    assert (blk.head_k, blk.mlp_k) == (1, 48)                                # chance: 1/3 and 1/4
    with torch.no_grad():
        heads = _recall(blk.ctx_pred.heads(ref["head_in"]), ref["head_imp"], blk.head_k)
        neurons = _recall(blk.ctx_pred.neurons(ref["mlp_in"]), ref["mlp_imp"], blk.mlp_k)
    blind_heads = _recall(prior["head_imp"].mean(0).expand_as(ref["head_imp"]), ref["head_imp"], blk.head_k)
    blind_neurons = _recall(prior["mlp_imp"].mean(0).expand_as(ref["mlp_imp"]), ref["mlp_imp"], blk.mlp_k)
    assert neurons > 0.85 and neurons > blind_neurons + 0.25, (neurons, blind_neurons)
    assert heads > 0.85 and heads > blind_heads + 0.1, (heads, blind_heads)
