"""Token merging (ToMe) and token pruning (EViT): exactness at r=0, persistence in the model
spec, ONNX export with onnxruntime parity and the TensorRT op check, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import timm
import torch

import effvision.models.small_vit  # noqa: F401
from effvision.dynamic import TokenReduceConfig, reduce_tokens_
from effvision.errors import ConfigError, EffVisionError
from effvision.export import OnnxExportConfig, export_model_dir
from effvision.export.tensorrt_check import check_tensorrt
from effvision.models.io import ModelSpec, create_model, load_model, save_model


def _vit(name="vit_micro_patch4_32", **kw):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kw).eval()


def test_tome_r0_is_exact_and_merging_shrinks_tokens():
    m, x = _vit(), torch.randn(2, 3, 32, 32)
    dense = m(x)
    reduce_tokens_(m, TokenReduceConfig(r=0))
    assert torch.equal(m(x), dense)
    m2 = _vit()
    counts = reduce_tokens_(m2, TokenReduceConfig(r=8))
    assert counts == [65, 57, 49, 41, 33]
    assert m2.state_dict().keys() == m.state_dict().keys()  # class swap, not wrapping


@pytest.mark.parametrize("kw", [dict(name="deit_tiny_distilled_patch16_224", img_size=64, depth=2),
                                dict(name="vit_tiny_patch16_224", img_size=64, depth=2, reg_tokens=2)])
def test_prefix_tokens_survive(kw):
    """Distilled and register-token ViTs: prefix tokens are never merged or pruned."""
    for cfg in (TokenReduceConfig(r=3), TokenReduceConfig(method="evit", keep_rate=0.5)):
        m = _vit(**kw)
        counts = reduce_tokens_(m, cfg)
        assert counts[-1] < counts[0]
        out = m(torch.randn(2, 3, 64, 64))
        assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_size_weighted_avg_pool_and_evit_refusal():
    m, x = _vit("convvit_tiny_32", depth=2), torch.randn(1, 3, 32, 32)
    reduce_tokens_(m, TokenReduceConfig(r=16))
    assert m(x).shape == (1, 10)
    with pytest.raises(EffVisionError, match="EViT needs a CLS token"):
        reduce_tokens_(_vit("convvit_tiny_32", depth=2), TokenReduceConfig(method="evit"))


def test_bad_input_one_line_before_any_change():
    m = _vit()
    with pytest.raises(ConfigError, match="at most"):
        reduce_tokens_(m, TokenReduceConfig(r=40))
    assert type(m.blocks[0]).__name__ == "Block"  # untouched
    with pytest.raises(ConfigError, match="keep_rate"):
        reduce_tokens_(m, TokenReduceConfig(method="evit", keep_rate=0.0))
    with pytest.raises(ConfigError, match="keep_rate"):
        reduce_tokens_(m, TokenReduceConfig(method="evit", keep_rate=1.5))
    with pytest.raises(EffVisionError, match="no handler for ResNet"):
        reduce_tokens_(timm.create_model("resnet10t", num_classes=2), TokenReduceConfig())


@pytest.mark.parametrize("cfg", [TokenReduceConfig(r=8, schedule="decreasing"),
                                 TokenReduceConfig(method="evit", keep_rate=0.6)])
def test_persist_and_export(tmp_path, cfg):
    """The spec's record rebuilds the reduced model without pickle; the ONNX export
    matches eager within 1e-4 at batch 1 and 4, has no scatter ops and passes the TensorRT check."""
    spec = ModelSpec(name="vit_micro_patch4_32", num_classes=10)
    model = create_model(spec).eval()
    reduce_tokens_(model, cfg)
    save_model(model, spec, tmp_path / "model")
    assert json.loads((tmp_path / "model" / "model.json").read_text())["modes"][0]["mode"] == "reduce_tokens"
    loaded, _ = load_model(tmp_path / "model")
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(loaded.eval()(x), model(x))
    out = export_model_dir(tmp_path / "model", tmp_path / "onnx", OnnxExportConfig(parity_batch_sizes=[1, 4]))
    assert out["parity"]["max_abs_error"] <= 1e-4
    graph = onnx.load(out["onnx"])
    ops = {n.op_type for n in graph.graph.node}
    assert not ops & {"ScatterElements", "ScatterND", "Scatter"}, ops
    assert "TopK" in ops
    assert check_tensorrt(graph) == []


def test_stage_preflight_rejects_before_the_run(tmp_path):
    """A merge count too large for the recipe's model fails the CLI's preflight: exit 2, no run dir."""
    from effvision.cli import main

    out = tmp_path / "run"
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart_tome.yaml"
    rc = main(["run", str(recipe), "--out", str(out), "--set", "stages.1.r=40"])
    assert rc == 2 and not out.exists()


def test_evit_keep_rate_schedule_ramps_to_the_target():
    """Fine-tuning's keep-rate schedule: all tokens at step 0, the target's counts from the end of
    the ramp on (the counts reduce_tokens_ set), in between in between; non-EViT models refused."""
    from effvision.dynamic.keep_schedule import KeepScheduleConfig, apply_keep_schedule, keep_rate_at
    from effvision.engine import Hooks

    cfg = TokenReduceConfig(method="evit", keep_rate=0.5)
    m = _vit()
    target = reduce_tokens_(m, cfg)
    hooks = Hooks()
    apply_keep_schedule(m, KeepScheduleConfig(ramp=0.5), hooks, "stages[1].keep_schedule")
    x = torch.randn(1, 3, 32, 32)

    def tokens_after_last_block(step: int) -> int:
        hooks.before_step[0](m, step, 100)
        return m._features(x)[0].shape[1]

    assert tokens_after_last_block(0) == 65 and tokens_after_last_block(50) == target[-1] == tokens_after_last_block(99)
    assert target[-1] < tokens_after_last_block(25) < 65
    assert keep_rate_at(0.5, 25, 100, 0.5) == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="not EViT-pruned"):
        apply_keep_schedule(_vit(), KeepScheduleConfig(), Hooks(), "stages[1].keep_schedule")
    with pytest.raises(ConfigError, match=r"keep_schedule.ramp: 1.0 is outside"):
        KeepScheduleConfig(ramp=1.0).validate("stages[1].keep_schedule")
