"""Early exit (effvision.dynamic.early_exit): heads after chosen blocks that leave the model's own
forward untouched, a batch-1 runner that stops at the first certain head, a threshold calibrated
to an accuracy budget, and the early_exit stage that trains, calibrates, measures and saves."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch

import effvision  # noqa: F401
from effvision.dynamic.early_exit import (ExitConfig, attach_exits_, calibrate_threshold, exit_logits,
                                          run_early_exit)
from effvision.errors import ConfigError, EffVisionError
from effvision.models.io import load_model

from conftest import cli, tiny_recipe


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_micro_patch4_32", num_classes=10).eval()


def test_exit_heads_leave_the_forward_unchanged_and_the_runner_stops_early() -> None:
    model = _model()
    x = torch.randn(3, 3, 32, 32)
    before = model(x)
    attach_exits_(model, [0, 2])
    outs = exit_logits(model, x)
    assert len(outs) == 3 and all(o.shape == (3, 10) for o in outs)
    torch.testing.assert_close(model(x), before)      # the timm forward (and export) is the plain model
    torch.testing.assert_close(outs[-1], before)      # the last output is the final head
    # Never certain enough: every block runs and the answer is the full model's.
    logits, run = run_early_exit(model, x[:1], threshold=1.01)
    assert run == 4 and torch.allclose(logits, before[:1], atol=1e-6)
    # Always certain: the first head answers after block 0.
    logits, run = run_early_exit(model, x[:1], threshold=0.0)
    assert run == 1 and torch.allclose(logits, outs[0][:1], atol=1e-6)


def test_calibration_keeps_the_accuracy_budget_on_its_data() -> None:
    model = attach_exits_(_model(), [1])
    batches = [(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))) for _ in range(2)]
    for budget in (0.0, 5.0):
        policy = calibrate_threshold(model, batches, "entropy", budget)
        assert policy["top1"] >= policy["full_top1"] - budget
        assert 0.5 <= policy["blocks_fraction"] <= 1.0 and 0.0 <= policy["threshold"] <= 1.0


def test_bad_exit_configs_are_one_line_errors() -> None:
    with pytest.raises(EffVisionError, match=r"exits.after: \[3\] must be increasing block indices in \[0, 2\]"):
        attach_exits_(_model(), [3])
    with pytest.raises(ConfigError, match="threshold: 1.5 is outside"):
        ExitConfig(threshold=1.5).validate("stages[1].exits")
    with pytest.raises(EffVisionError, match="no handler"):
        attach_exits_(timm.create_model("resnet18", num_classes=10), [1])


def test_early_exit_stage_trains_calibrates_and_saves(tmp_path: Path) -> None:
    stages = [{"type": "train", "epochs": 2, "log_every": 4, "optimizer": {"name": "adamw", "lr": 2.0e-3}},
              {"type": "early_exit", "epochs": 2, "log_every": 4, "eval_every": 0, "latency_images": 8,
               "optimizer": {"name": "adamw", "lr": 1.0e-3},
               "exits": {"after": [1], "distill": 0.5, "accuracy_budget": 2.0, "calib_batches": 2}}]
    recipe = tiny_recipe(tmp_path / "r.yaml", stages=stages, data={"holdout": 64})
    r = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "run" / "02-early_exit" / "summary.json").read_text())
    assert 0.0 < s["blocks_fraction"] <= 1.0 and set(s["exit_top1"]) == {"1"}
    assert s["calibration"]["split"] == "holdout"  # data.holdout: calibrated on images never trained on
    assert s["latency"]["torch"]["images"] == 8 and s["latency"]["onnxruntime"]["early_exit_ms_p50"] > 0
    # The model dir rebuilds the heads (its record's early_exit mode) and keeps the calibrated policy.
    model, spec = load_model(tmp_path / "run" / "02-early_exit" / "model")
    assert spec.modes[-1]["mode"] == "early_exit" and model.exit_policy == ("confidence", s["threshold"])
    assert len(model.exit_heads) == 1

    bad = tiny_recipe(tmp_path / "bad.yaml", stages=[stages[0], {**stages[1], "exits": {"after": [7]}}])
    r = cli("run", str(bad), "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "stages[1].exits.after" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_onnx_multi_exit_graph_and_segment_runner_match_pytorch(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from effvision.dynamic.early_exit_onnx import OrtEarlyExit, export_early_exit

    model = attach_exits_(_model(), [1])
    manifest = export_early_exit(model, tmp_path, (3, 32, 32), threshold=0.5, criterion="confidence")
    assert all(err < 1e-4 for err in manifest["parity_max_abs_error"].values())
    assert [s["blocks"] for s in manifest["segments"]] == [[0, 2], [2, 4]]
    x = torch.randn(1, 3, 32, 32)
    for threshold in (0.0, 1.01):  # stops at the exit / runs every block
        runner = OrtEarlyExit(tmp_path)
        runner.threshold = threshold
        got, run = runner(x.numpy())
        ref, ref_run = run_early_exit(model, x, threshold)
        assert run == ref_run and abs(got - ref.numpy()).max() < 1e-4


def _certainty(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """Written out: the top softmax probability, or 1 - entropy / log(classes)."""
    p = logits.softmax(-1)
    if criterion == "confidence":
        return p.max(-1).values
    return 1.0 + (p * p.log()).sum(-1) / math.log(p.shape[-1])


@pytest.mark.parametrize("criterion", ["confidence", "entropy"])
def test_calibration_lets_easy_images_exit_within_the_budget(criterion: str) -> None:
    """The 40% of images the exit head is most certain about are easy: it answers them right (the
    labels say so); the rest are labelled with the full model's answer. Every easy image may then
    leave at no cost, so even a zero budget must calibrate a threshold at which at least 40% exit
    early, and the accuracy there (simulated here, and on the batch-1 runner) is at least the full model's."""
    model = attach_exits_(_model(), [0])
    torch.manual_seed(1)
    x = torch.randn(128, 3, 32, 32)
    with torch.no_grad():
        exit_z = model.exit_heads[0](model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(x)))))
        final_z = model(x)
    cert = _certainty(exit_z, criterion)
    easy = cert >= cert.quantile(0.6)
    labels = torch.where(easy, exit_z.argmax(-1), final_z.argmax(-1))
    full = 100.0 * float((final_z.argmax(-1) == labels).float().mean())
    policy = calibrate_threshold(model, [(x[:64], labels[:64]), (x[64:], labels[64:])], criterion, budget=0.0)
    leaves = cert >= policy["threshold"] - 1e-6  # the threshold is an image's certainty, recomputed here in another batch
    top1 = 100.0 * float((torch.where(leaves, exit_z.argmax(-1), final_z.argmax(-1)) == labels).float().mean())
    assert policy["full_top1"] == pytest.approx(full) and policy["top1"] == pytest.approx(top1)
    assert bool(leaves[easy].all()), f"{int(leaves[easy].sum())} of the {int(easy.sum())} easy images leave early, not all"
    assert top1 >= full, (top1, full)
    assert policy["blocks_fraction"] == pytest.approx((1 + 3 * (1 - leaves.float().mean().item())) / 4)
    for i in cert.topk(4).indices.tolist():  # the runner stops after block 0 on the easiest images, with the right answer
        logits, run = run_early_exit(model, x[i:i + 1], policy["threshold"], criterion)
        assert run == 1 and int(logits.argmax()) == int(labels[i])
