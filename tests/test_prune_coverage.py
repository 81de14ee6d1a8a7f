"""Structured pruning across the timm families the issue names, on small inputs (CPU).

For each family: prune 30% of every kind it has, then what later stages rely on: forward
with the same output shape, one training step, the saved spec rebuilding the same model in
this process from JSON + safetensors (as a fresh process does), and ONNX export whose
onnxruntime outputs match PyTorch (atol 1e-4, the export stage's default). Families that
Torch-Pruning cannot handle must fail with the clear error, not a crash or a hang.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.attention import Attention

import effvision  # noqa: F401  (registers effvision's own models)
from effvision.compress import PruneSpec, describe_pruned, kinds_of, prune_
from effvision.errors import EffVisionError
from effvision.export import OnnxExportConfig, check_parity, export_onnx
from effvision.models.io import ModelSpec, load_model, save_model

ALL = {k: 0.3 for k in ("heads", "mlp", "width", "channels")}

# (timm name, extra kwargs, input size): small inputs, and fewer blocks where timm allows it
# (same module types, a smaller graph: ONNX export time grows with it).
FAMILIES = [
    ("vit_micro_patch4_32", {}, 32),
    ("convvit_tiny_32", {"depth": 2}, 32),
    ("convvit_tiny_32", {"depth": 2, "qk_norm": True}, 32),  # per-head q/k LayerNorms (the GPU recipes' setting)
    ("deit_tiny_patch16_224", {"img_size": 64, "depth": 2}, 64),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64, "depth": 2}, 64),
    ("mobilenetv3_small_050", {}, 64),
    ("mobilenetv4_conv_small", {}, 64),
    ("levit_128s", {"img_size": 64, "depth": (1, 1, 1)}, 64),
    ("fastvit_t8", {"layers": (1, 1, 1, 1)}, 64),
    ("convnext_atto", {"depths": (1, 1, 1, 1)}, 64),
    ("resnet18", {}, 64),
    ("regnetx_002", {}, 64),
    ("test_efficientnet", {}, 64),         # timm's small EfficientNet (same classes as b0)
    ("tiny_vit_5m_224", {"depths": (1, 1, 1, 1)}, 64),
]
# Families no handler covers: a one-line error naming the family, before anything is written.
UNCOVERED = [
    ("efficientvit_b0", {}, 64, "Torch-Pruning failed"),
    ("efficientvit_m0", {"img_size": 64}, 64, "cascaded group attention"),
]


def _logits(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message="Unwrapped parameters")


@pytest.mark.parametrize("name,kwargs,size", FAMILIES,
                         ids=[f[0] + ("-qk_norm" if f[1].get("qk_norm") else "") for f in FAMILIES])
def test_prune_family(name: str, kwargs: dict, size: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = ModelSpec(name, kwargs=kwargs, num_classes=10, img_size=size)
    model = timm.create_model(name, num_classes=10, **kwargs)
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, size, size)
    n0 = sum(p.numel() for p in model.parameters())

    prune_(model, PruneSpec(ratios=ALL, criterion="l1"), x)
    assert sum(p.numel() for p in model.parameters()) < 0.9 * n0  # physically smaller
    model.eval()
    assert model(x).shape == (2, 10)
    for a in (m for m in model.modules() if type(m) is Attention):
        assert a.fused_attn  # SDPA stays on
        assert a.qkv.out_features == 3 * a.num_heads * a.head_dim == 3 * a.attn_dim
        assert (type(a.q_norm).__name__ == "LayerNorm") == bool(kwargs.get("qk_norm"))  # per-head norms kept

    # The spec alone rebuilds it: JSON of the changed sizes + safetensors, no pickle.
    save_model(model, spec, tmp_path / "model")
    rebuilt, loaded = load_model(tmp_path / "model")
    assert [m["mode"] for m in loaded.modes] == ["prune"]
    assert loaded.modes[0]["metadata"] == describe_pruned(model, dense)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
        feats = rebuilt.forward_features(x)
        torch.testing.assert_close(rebuilt.forward_head(feats), model(x), rtol=0, atol=0)

    onnx = export_onnx(rebuilt, tmp_path / "m.onnx", (3, size, size), OnnxExportConfig())
    parity = check_parity(rebuilt, onnx, (3, size, size), [2], 1e-4)
    assert parity["max_abs_error"] <= 1e-4

    # One training step (on the rebuilt model: what a finetune stage trains).
    rebuilt.train()
    opt = torch.optim.SGD(rebuilt.parameters(), lr=0.01)
    loss = F.cross_entropy(_logits(rebuilt(x)), torch.tensor([1, 2]))
    loss.backward()
    assert all(p.grad is not None for p in rebuilt.parameters() if p.requires_grad)
    opt.step()
    assert all(p.isfinite().all() for p in rebuilt.parameters())


def test_pruned_vit_keeps_timm_contract(tmp_path: Path) -> None:
    """Heads, MLP and width all shrink; forward_intermediates and feature_info follow."""
    torch.manual_seed(0)
    model = timm.create_model("vit_micro_patch4_32", num_classes=10)  # width 96, 3 heads, MLP 192
    x = torch.randn(2, 3, 32, 32)
    prune_(model, PruneSpec(ratios={"heads": 0.3, "mlp": 0.5, "width": 0.25}), x)
    assert [b.attn.num_heads for b in model.blocks] == [2] * 4
    assert [b.mlp.fc1.out_features for b in model.blocks] == [96] * 4
    assert model.embed_dim == model.num_features == model.head.in_features == 72
    assert model.cls_token.shape[-1] == model.pos_embed.shape[-1] == 72
    final, maps = model.eval().forward_intermediates(x)
    assert [m.shape for m in maps] == [(2, 72, 8, 8)] * 4
    assert [f["num_chs"] for f in model.feature_info] == [72] * 4


def test_unpruned_kinds_keep_their_size() -> None:
    model = timm.create_model("vit_micro_patch4_32", num_classes=10)
    prune_(model, PruneSpec(ratios={"mlp": 0.5}), torch.randn(2, 3, 32, 32))
    assert model.embed_dim == 96 and all(b.attn.num_heads == 3 for b in model.blocks)
    assert kinds_of(model)["mlp"][0].out_features == 96


@pytest.mark.parametrize("name,kwargs,size,why", UNCOVERED, ids=[u[0] for u in UNCOVERED])
def test_uncovered_family_is_a_clear_error(name: str, kwargs: dict, size: int, why: str) -> None:
    model = timm.create_model(name, num_classes=10, **kwargs)
    with pytest.raises(EffVisionError, match=rf"no handler covers {name}.*{why}"):
        prune_(model, PruneSpec(ratios=ALL, criterion="l1"), torch.randn(2, 3, size, size))


def test_bad_prune_inputs_name_the_problem() -> None:
    model = timm.create_model("vit_micro_patch4_32", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(EffVisionError, match=r"each ratio in \[0, 1\)"):
        prune_(model, PruneSpec(ratios={"mlp": 1.2}), x)
    with pytest.raises(EffVisionError, match="no module named blocks.9.attn"):
        prune_(model, PruneSpec(ratios={"mlp": 0.5}, ignore=["blocks.9.attn"]), x)
    with pytest.raises(EffVisionError, match="needs calibration batches"):
        prune_(model, PruneSpec(ratios={"mlp": 0.5}, criterion="taylor"), x)
    with pytest.raises(EffVisionError, match="nothing to prune"):
        prune_(timm.create_model("resnet18", num_classes=10), PruneSpec(ratios={"heads": 0.5}), torch.randn(2, 3, 64, 64))
    assert model.embed_dim == 96  # the model was not touched
