"""Per-head sparse-attention policies on a real timm ViT: profiling keeps the chosen mass,
the swapped model keeps its state-dict keys and reloads from disk, the stage runs in a recipe,
and bad input fails with one line before any work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import effvision.models  # noqa: F401  (registers vit_micro_patch4_32)
from effvision.attention import (SparseAttention, SparseAttentionConfig, apply_policies, density_report, model_grid,
                                 read_policies, sparsify_attention_)
from effvision.attention.policies import Grid, block_cover, expand_blocks, policy_token_mask
from effvision.errors import ConfigError, EffVisionError
from effvision.models.io import ModelSpec, create_model, load_model, save_model

from conftest import REPO, SHARED, cli, needs_shared, tiny_recipe


def _model():
    torch.manual_seed(0)
    return create_model(ModelSpec(name="vit_micro_patch4_32", num_classes=10)).eval()


def test_policy_masks_on_the_grid() -> None:
    g = Grid(prefix=1, h=4, w=4)
    local = policy_token_mask({"kind": "special+local", "radius": 1}, g)
    assert local[0].all() and local[:, 0].all()            # CLS row and column
    assert local[1 + 5, 1 + 0] and not local[1 + 0, 1 + 15]  # (1,1) sees (0,0); (0,0) not (3,3)
    strided = policy_token_mask({"kind": "strided", "stride": 2}, g)
    assert strided[5, 1 + 2] and not strided[5, 1 + 1]        # column (0,2) kept, (0,1) not
    bm = block_cover(local, 16)
    assert bm.shape == (2, 2) and expand_blocks(bm, 17, 16).shape == (17, 17)


def test_profiling_keeps_the_mass_and_swaps_in_place(tmp_path: Path) -> None:
    model = _model()
    x = torch.randn(8, 3, 32, 32)
    dense = model(x)
    keys = list(model.state_dict())
    cfg = SparseAttentionConfig(recovery=0.9, block=16)
    spec = sparsify_attention_(model, cfg, [x[:4], x[4:]])
    assert all(h["kept"] >= 0.9 - 1e-6 for heads in spec["layers"].values() for h in heads)
    assert isinstance(model.blocks[0].attn, SparseAttention) and list(model.state_dict()) == keys
    report = density_report(spec)
    assert 0 < report["mean_density"] < 1 and len(report["per_head"]) == len(model.blocks)
    sparse = model(x)
    assert not torch.allclose(sparse, dense) and torch.isfinite(sparse).all()
    # recovery 1.0 keeps every block: the dense output
    full = _model()
    sparsify_attention_(full, SparseAttentionConfig(recovery=1.0, block=16), [x])
    torch.testing.assert_close(full(x), dense, rtol=1e-4, atol=1e-5)
    # on disk: spec (policies in the record's sparse_attention mode) + safetensors, reloaded in a fresh model
    out = tmp_path / "m"
    save_model(model, ModelSpec(name="vit_micro_patch4_32", num_classes=10), out)
    loaded, loaded_spec = load_model(out)
    assert read_policies(loaded_spec)["layers"] == spec["layers"]
    assert isinstance(loaded.blocks[1].attn, SparseAttention)
    torch.testing.assert_close(loaded(x), sparse, rtol=1e-5, atol=1e-6)


def test_bad_input_is_one_line_error() -> None:
    with pytest.raises(ConfigError, match=r"recovery must be in \(0, 1\]"):
        SparseAttentionConfig(recovery=1.5).validate()
    with pytest.raises(ConfigError, match="recovery"):
        sparsify_attention_(_model(), SparseAttentionConfig(recovery=0.0), [torch.randn(2, 3, 32, 32)])
    model = _model()
    spec = sparsify_attention_(_model(), SparseAttentionConfig(recovery=0.9, block=16), [torch.randn(2, 3, 32, 32)])
    name = next(iter(spec["layers"]))
    spec["layers"][name] = spec["layers"][name][:-1]
    with pytest.raises(EffVisionError, match="heads; the model has"):
        apply_policies(model, spec)
    assert not any(isinstance(m, SparseAttention) for m in model.modules())   # nothing swapped
    assert model_grid(model) == Grid(prefix=1, h=8, w=8)


def test_sparse_attention_stage_in_a_recipe(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "r.yaml", data={"limit_train": 128, "limit_eval": 64, "batch_size": 32}, stages=[
        {"type": "train", "epochs": 1, "optimizer": {"name": "adamw", "lr": 2.0e-3}},
        {"type": "sparse_attention", "recovery": 0.95, "block": 16, "calib_batches": 1},
        {"type": "export", "format": "onnx", "opset": 18}])
    run = tmp_path / "run"
    p = cli("run", str(recipe), "--out", str(run))
    assert p.returncode == 0, p.stderr[-2000:]
    stage = run / "02-sparse_attention"
    summary = json.loads((stage / "summary.json").read_text())
    assert 0 < summary["density"]["mean_density"] <= 1 and "per_head" in summary["density"]
    model_json = json.loads((stage / "model" / "model.json").read_text())
    assert [m["mode"] for m in model_json["modes"]] == ["sparse_attention"]
    # export: block gather / masked dense per head, parity-checked against the sparse model
    manifest = json.loads(next(run.glob("03-export/**/manifest.json")).read_text())
    kinds = manifest["sparse_attention"]["kinds"]
    assert sum(k["heads"] for k in kinds.values()) == 4 * 3  # every head of the 4 blocks has a policy
    for k in kinds.values():  # the expectation follows from how many of the kind's heads gather
        g, n = k["block_gather_heads"], k["heads"]
        label = "yes" if g == n else "no" if g == 0 else f"partly ({g} of {n} heads)"
        assert k["expected_onnxruntime_speedup"] == label
    assert manifest["parity"]["max_abs_error"] <= 1e-4
    bad = tiny_recipe(tmp_path / "bad.yaml", stages=[{"type": "sparse_attention", "recovery": 2}])
    p = cli("run", str(bad), "--out", str(tmp_path / "bad"))
    assert p.returncode == 2 and "recovery" in p.stderr and not (tmp_path / "bad").exists()


@needs_shared
def test_sparse_attention_stage_on_a_detector(tmp_path: Path) -> None:
    """recipes/detection_vit_sparse_attention.yaml at toy size: the detector's ViT backbone is
    profiled at the detection grid (128x128 = 32x32 tokens) and saved with its policies; the next
    stages reload exactly that sparse detector and export its backbone (parity-checked)."""
    from effvision.detection.io import load_detector
    from effvision.recipe import load_recipe
    from effvision.stages import preflight

    coco = SHARED / "datasets" / "coco128"
    sets = ["device=cpu", "model.kwargs={depth: 2}", "stages.train_detection.epochs=1",
            "stages.train_detection.warmup_steps=0", "stages.train_detection.out_channels=32",
            "stages.train_detection.detector_options={score_thresh: 0.0}",  # an untrained detector's boxes, to compare
            "stages.sparse_attention.calib_batches=1"]
    for stage in ("train_detection", "sparse_attention", "eval_detection"):
        sets += [f"stages.{stage}.data.root={coco}", f"stages.{stage}.data.limit_images=4",
                 f"stages.{stage}.data.batch_size=2"]
    run = tmp_path / "run"
    p = cli("run", str(REPO / "recipes" / "detection_vit_sparse_attention.yaml"), "--out", str(run),
            *[a for item in sets for a in ("--set", item)])
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads((run / "02-sparse_attention" / "summary.json").read_text())
    assert 0 < summary["density"]["mean_density"] <= 1 and {"dense", "sparse"} <= set(summary)
    det, spec = load_detector(run / "02-sparse_attention" / "detector")
    assert spec.attention["grid"] == {"prefix": 1, "h": 32, "w": 32}
    assert sum(isinstance(m, SparseAttention) for m in det.modules()) == 2
    evaluated = json.loads((run / "03-eval_detection" / "summary.json").read_text())
    assert evaluated["detector_dir"].endswith("02-sparse_attention/detector")
    assert evaluated["detections"] == summary["sparse"]["detections"] > 0
    exported = json.loads((run / "04-export_detection" / "summary.json").read_text())
    assert exported["parity"]["max_abs_error"] <= 1e-3
    manifest = json.loads(next(run.glob("04-export_detection/**/manifest.json")).read_text())
    assert manifest["sparse_attention"]["kinds"]
    # no detector to sparsify: refused by the run's preflight, before any run directory exists
    bad = load_recipe(tiny_recipe(tmp_path / "bad.yaml", stages=[{"type": "sparse_attention", "data": {"root": str(coco)}}]))
    with pytest.raises(ConfigError, match="stage 1 .* needs a train_detection stage before it"):
        preflight(bad)


def test_gpu_bench_section_runs_at_toy_size() -> None:
    import argparse

    from effvision.attention.gpu_section import sparse_attention_markdown, sparse_attention_section
    from effvision.benchmarks.registry import sections

    assert sections()["sparse_attention"].run_ref == "effvision.attention.gpu_section:sparse_attention_section"
    rows = sparse_attention_section(argparse.Namespace(toy=True, data=None, runs=None, stamp="t"))
    ok = [r for r in rows if "error" not in r]
    assert {r["backend"] for r in ok} == {"sdpa dense", "effvision kernel", "flex_attention"}
    # FlexAttention has no backward on the CPU: its fwd+bwd is n/a there, timed everywhere else
    assert all(r["fwd_ms"] > 0 and (r["fwd_bwd_ms"] is None) == (r["backend"] == "flex_attention") for r in ok)
    md = sparse_attention_markdown(rows)
    assert md[0].startswith("| N | block density") and any("auto: " in line for line in md)  # runner adds the heading
