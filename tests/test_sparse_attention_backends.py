"""Sparse attention beyond the eager module: the export form (block gather for local windows,
masked dense otherwise) against the reference and through onnxruntime, the FlexAttention backend
on the CPU, the backend table, a ViTDet detection backbone at 128x128 (1,025 tokens), and bad
input that must fail before any work."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import effvision.models  # noqa: F401  (registers vit_micro_patch4_32)
from effvision.attention import (SparseAttention, SparseAttentionConfig, apply_policies, attend, model_grid,
                                 pick_backend, sparsify_attention_)
from effvision.attention.export import BlockGatherAttention
from effvision.attention.policies import Grid, block_cover, policy_token_mask
from effvision.errors import ConfigError, EffVisionError
from effvision.kernels.block_sparse_attention import block_sparse_attention_ref
from effvision.models.io import ModelSpec, create_model, load_model, save_model

GRID = Grid(prefix=1, h=16, w=16)   # 257 tokens: 17 blocks of 16
POLICIES = [{"kind": "local", "radius": 1}, {"kind": "special+local", "radius": 1},
            {"kind": "heavy", "cols": list(range(1, 257, 5))}]


def _masks(policies, grid=GRID, block=16):
    return torch.stack([block_cover(policy_token_mask(p, grid), block) for p in policies])


def test_block_gather_is_exact_and_chosen_for_local_windows() -> None:
    torch.manual_seed(0)
    bm = _masks(POLICIES + [{"kind": "special"}])
    bm[3, 4] = False                                                  # an empty query block: zeros
    plan = BlockGatherAttention(bm, GRID.n, 16)
    assert plan.gathered == [True, True, False, True]                 # heavy columns spread: masked dense
    q, k, v = [torch.randn(2, 4, GRID.n, 32) for _ in range(3)]
    ref = block_sparse_attention_ref(q, k, v, bm, 16, 0.3)
    torch.testing.assert_close(plan(q, k, v, 0.3), ref, rtol=1e-5, atol=1e-6)
    assert plan(q, k, v, 0.3)[:, 3, 64:80].abs().max() == 0
    # any mask, every head gathered (tail block 70 = 4 * 16 + 6, random rows incl. empty ones)
    bm = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(2)) < 0.4
    bm[0, 1] = False
    plan = BlockGatherAttention(bm, 70, 16, max_cost=1.0)
    q, k, v = [torch.randn(2, 3, 70, 32) for _ in range(3)]
    torch.testing.assert_close(plan(q, k, v, 0.2), block_sparse_attention_ref(q, k, v, bm, 16, 0.2),
                               rtol=1e-5, atol=1e-6)


def test_onnx_export_uses_the_gathered_form_with_parity(tmp_path: Path) -> None:
    """Local-window heads export as block gather, heavy hitters as masked dense; onnxruntime
    matches the eager sparse model within 1e-4 and the manifest says per kind which form it
    exported and so whether the cost rule expects a speedup in onnxruntime (an expectation, not
    timed here)."""
    from effvision.export.model_dir import export_model_dir
    from effvision.export.onnx import OnnxExportConfig

    spec = ModelSpec(name="vit_micro_patch4_32", num_classes=10, img_size=64, kwargs={"img_size": 64, "depth": 1})
    torch.manual_seed(0)
    model = create_model(spec).eval()
    assert model_grid(model) == GRID
    heads = [{"policy": p, "density": 0.0, "kept": 1.0} for p in POLICIES]
    pol = {"grid": {"prefix": 1, "h": 16, "w": 16}, "block": 16, "layers": {"blocks.0.attn": heads}}
    spec.modes = [{"mode": "sparse_attention", "version": 1, "config": {}, "metadata": pol}]
    model = create_model(spec).eval()  # the record's mode applies the policies
    assert isinstance(model.blocks[0].attn, SparseAttention)
    src = tmp_path / "model"
    save_model(model, spec, src)
    export_model_dir(src, tmp_path / "export", OnnxExportConfig(parity_batch_sizes=[1, 2]))
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["parity"]["max_abs_error"] <= 1e-4
    kinds = manifest["sparse_attention"]["kinds"]
    assert kinds["local"]["expected_onnxruntime_speedup"] == "yes"
    assert kinds["special+local"]["expected_onnxruntime_speedup"] == "yes"
    assert kinds["heavy"]["expected_onnxruntime_speedup"] == "no" and kinds["heavy"]["heads"] == 1
    # the graph really gathers key blocks (not a dense N x N attention only)
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "export" / "model.onnx")).graph.node}
    assert "Gather" in ops


def test_flex_attention_backend_on_cpu_matches_the_reference() -> None:
    torch.manual_seed(0)
    bm = _masks(POLICIES)
    q, k, v = [torch.randn(2, 3, GRID.n, 32) for _ in range(3)]
    ref = block_sparse_attention_ref(q, k, v, bm, 16, 0.25)
    cache: dict = {}
    with torch.no_grad():  # FlexAttention runs forward-only on the CPU (eager, unfused)
        out = attend(q, k, v, bm, 16, 0.25, backend="flex", cache=cache)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(cache) == 1                                            # its BlockMask is built once
    # training on the CPU: FlexAttention has no backward there -> the reference, warned once
    qg = q.clone().requires_grad_()
    with pytest.warns(UserWarning, match="no backward on the CPU"):
        out = attend(qg, k, v, bm, 16, 0.25, backend="flex")
    out.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attend(qg, k, v, bm, 16, 0.25, backend="flex")
    # the whole model with the flex backend gives the sdpa backend's logits
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for backend in ("flex", "sdpa"):
        torch.manual_seed(0)
        m = create_model(ModelSpec(name="vit_micro_patch4_32", num_classes=10)).eval()
        sparsify_attention_(m, SparseAttentionConfig(recovery=0.9, block=16, backend=backend), [x])
        with torch.no_grad():
            outs.append(m(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_backend_table() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert pick_backend("auto", 197, cuda) == "sdpa" and pick_backend("auto", 4097, cuda) == "kernel"
    assert pick_backend("auto", 4097, cpu) == "sdpa" and pick_backend("flex", 197, cpu) == "flex"


def test_detection_backbone_at_high_resolution() -> None:
    """A ViTDet pyramid on vit_micro at 128x128 (1,025 tokens): profile the backbone, swap its
    attention, and the detector still trains and predicts at that size."""
    from effvision.detection.backbone import backbone
    from effvision.detection.detectors import build_detector

    torch.manual_seed(0)
    body = backbone("vit_micro_patch4_32", out_channels=32, kwargs={"depth": 2})
    det = build_detector("fcos", body, num_classes=4, min_size=128, max_size=128, fixed_size=(128, 128))
    images = torch.rand(2, 3, 128, 128)
    cfg = SparseAttentionConfig(recovery=0.9, block=64, radii=[2], strides=[4], heavy_fractions=[0.1])
    spec = sparsify_attention_(body, cfg, [images])
    assert spec["grid"] == {"prefix": 1, "h": 32, "w": 32}
    swapped = [m for m in body.modules() if isinstance(m, SparseAttention)]
    assert len(swapped) == 2 and swapped[0].block_mask.shape == (3, 17, 17)
    det.eval()
    with torch.no_grad():
        (out,) = det([images[0]])
    assert set(out) == {"boxes", "scores", "labels"}
    det.train()
    losses = det([images[1]], [{"boxes": torch.tensor([[8.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1])}])
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and swapped[0].qkv.weight.grad is not None


def test_bad_input_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="backend must be one of"):
        SparseAttentionConfig(backend="cuda").validate()
    model = create_model(ModelSpec(name="vit_micro_patch4_32", num_classes=10))
    heads = [{"policy": {"kind": "full"}, "density": 1.0, "kept": 1.0}] * 3
    with pytest.raises(EffVisionError, match="special tokens; the model has 1"):
        apply_policies(model, {"grid": {"prefix": 2, "h": 8, "w": 8}, "block": 16, "layers": {"blocks.0.attn": heads}})
    with pytest.raises(EffVisionError, match="backend 'tpu'"):
        apply_policies(model, {"grid": {"prefix": 1, "h": 8, "w": 8}, "block": 16, "backend": "tpu",
                               "layers": {"blocks.0.attn": heads}})
    with pytest.raises(EffVisionError, match="16x16 token grid; the model runs 8x8"):
        apply_policies(model, {"grid": {"prefix": 1, "h": 16, "w": 16}, "block": 16, "layers": {"blocks.0.attn": heads}})
    assert not any(isinstance(m, SparseAttention) for m in model.modules())
    # from disk: a model dir whose policies have other heads fails in load_model, before the weights load
    save_model(model, ModelSpec(name="vit_micro_patch4_32", num_classes=10), tmp_path)
    bad = {"grid": {"prefix": 1, "h": 8, "w": 8}, "block": 16, "layers": {"blocks.0.attn": heads[:2]}}
    spec = json.loads((tmp_path / "model.json").read_text())
    spec["modes"] = [{"mode": "sparse_attention", "version": 1, "config": {}, "metadata": bad}]
    (tmp_path / "model.json").write_text(json.dumps(spec))
    with pytest.raises(EffVisionError, match="'blocks.0.attn' have 2 heads; the model has 3"):
        load_model(tmp_path)
    q = torch.randn(1, 3, 65, 32)
    with pytest.raises(ValueError, match=r"shape \(heads=3, 5, 5\)"):
        attend(q, q, q, torch.ones(2, 5, 5, dtype=torch.bool), 16, 0.2, backend="flex")
