"""effvision.stability (`effvision check`): the bf16 CPU check run before a recipe gets a GPU call."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import REPO, SHARED, needs_shared, tiny_recipe
from effvision.cli import main
from effvision.stability import ATTN_LOGIT_LIMIT, probe_stability


def test_a_diverging_learning_rate_is_caught(tmp_path: Path) -> None:
    # vit_micro on digits at lr 1.0 without clipping: the loss or the attention logits blow up
    recipe = tiny_recipe(tmp_path / "r.yaml", train={"optimizer": {"name": "adamw", "lr": 1.0}})
    report = probe_stability(recipe, steps=8, batch_size=8)
    assert report.problems, report.summary()
    # the same model at a sane lr passes, and every statistic is recorded per step
    ok = tiny_recipe(tmp_path / "ok.yaml")
    assert main(["check", str(ok), "--steps", "8", "--batch-size", "8"]) == 0
    report = probe_stability(ok, steps=8, batch_size=8)
    assert len(report.loss) == len(report.attn_logit_max) == len(report.grad_norm) == 8
    assert all(math.isfinite(v) and 0 < v < ATTN_LOGIT_LIMIT for v in report.attn_logit_max)


@needs_shared
@pytest.mark.slow
def test_cifar10_reference_recipe_passes_the_check(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # decode cache
    report = probe_stability(REPO / "recipes" / "cifar10_vit_tiny.yaml",
                             [f"data.root={SHARED / 'datasets' / 'cifar10'}"], steps=3, batch_size=4)
    assert report.problems == [] and report.lr == 2.0e-3 and report.grad_clip == 1.0, report.summary()
