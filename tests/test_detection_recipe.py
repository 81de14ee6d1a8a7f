"""recipes/detection_coco128.yaml through `effvision run` on the CPU: a few iterations on a
few coco128 images (the loss falls), COCO mAP, backbone ONNX export; bad data fails first."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, SHARED, cli, needs_shared, tiny_recipe

RECIPE = REPO / "recipes" / "detection_coco128.yaml"
COCO128 = SHARED / "datasets" / "coco128"
# Six updates over four images at ~100 px: the recipe's model and detector, CPU-sized.
SMALL = ["device=cpu", f"stages.0.data.root={COCO128}", "stages.0.data.limit_images=4",
         "stages.0.data.batch_size=2", "stages.0.data.num_workers=0", "stages.0.data.hflip=false",
         "stages.0.epochs=3", "stages.0.warmup_steps=1", "stages.0.log_every=1", "stages.0.min_size=96",
         "stages.0.max_size=128", "stages.0.out_channels=32",
         "stages.0.detector_options={representation_size: 128, box_batch_size_per_image: 64}",
         f"stages.1.data.root={COCO128}", "stages.1.data.limit_images=4", "stages.2.size=[96,128]"]


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@needs_shared
@pytest.mark.slow
def test_detection_recipe_cpu(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = cli("run", str(RECIPE), "--out", str(run), *_sets(SMALL))
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = json.loads((run / "01-train_detection" / "summary.json").read_text())
    assert train["steps"] == 6 and train["backbone"] == "mobilenetv3_large_100"
    steps = [json.loads(line) for line in (run / "01-train_detection" / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses  # the loss falls
    ev = json.loads((run / "02-eval_detection" / "summary.json").read_text())
    assert ev["images"] == 4 and 0.0 <= ev["bbox_mAP50"] <= 1.0 and "bbox_mAP" in ev
    assert (run / "02-eval_detection" / "cocoeval.txt").is_file()
    ex = json.loads((run / "03-export_detection" / "summary.json").read_text())
    assert ex["size"] == [96, 128] and ex["parity"]["max_abs_error"] <= 1e-3
    assert (run / "03-export_detection" / "backbone.onnx").is_file()


@needs_shared
def test_detection_recipe_bad_data_fails_before_work(tmp_path: Path) -> None:
    data = json.loads((COCO128 / "annotations" / "instances.json").read_text())
    first = min(im["id"] for im in data["images"])  # within limit_images
    next(a for a in data["annotations"] if a["image_id"] == first)["bbox"] = [1, 2, -3, 4]
    (tmp_path / "ann.json").write_text(json.dumps(data))
    sets = SMALL + [f"stages.0.data.root={tmp_path}", f"stages.0.data.images={COCO128 / 'images'}",
                    "stages.0.data.annotations=ann.json"]
    run = tmp_path / "run"
    proc = cli("run", str(RECIPE), "--out", str(run), *_sets(sets))
    assert proc.returncode == 2
    assert "1 degenerate box(es)" in proc.stderr and "on_bad: skip" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not run.exists()  # checked before the run directory was made
    proc = cli("run", str(RECIPE), "--out", str(run), *_sets(SMALL + ["stages.0.backbone=./no/such/run"]))
    assert proc.returncode == 2 and "backbone not found" in proc.stderr


@needs_shared
@pytest.mark.slow
def test_detection_starts_from_the_previous_stages_model(tmp_path: Path) -> None:
    # A classification stage's model (here trained; a pruned one arrives the same way) becomes
    # the detection backbone, weights included.
    stages = [
        {"type": "train", "epochs": 1, "optimizer": {"name": "adamw", "lr": 2.0e-3}, "log_every": 4},
        {"type": "train_detection", "detector": "fcos", "out_channels": 32, "epochs": 1, "warmup_steps": 0,
         "min_size": 64, "max_size": 96, "log_every": 1,
         "data": {"root": str(COCO128), "limit_images": 2, "batch_size": 2, "hflip": False}},
    ]
    recipe = tiny_recipe(tmp_path / "r.yaml", stages=stages, data={"limit_train": 128, "limit_eval": 64})
    run = tmp_path / "run"
    proc = cli("run", str(recipe), "--out", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((run / "02-train_detection" / "summary.json").read_text())
    assert s["backbone"] == "vit_micro_patch4_32" and s["backbone_source"] == str(run / "01-train" / "model")
    from effvision.detection import load_detector
    from effvision.models.io import load_model

    det, spec = load_detector(run / "02-train_detection" / "detector")
    trunk, _ = load_model(run / "01-train" / "model")
    assert spec.backbone["num_classes"] == 10 and spec.kind == "fcos"
    # Patch embedding weights moved in one detection step but started from the trained ones.
    got = det.backbone.body.model.patch_embed.proj.weight
    assert got.shape == trunk.patch_embed.proj.weight.shape
    assert torch.allclose(got, trunk.patch_embed.proj.weight, atol=0.05)
