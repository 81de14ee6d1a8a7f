"""Compressing a trained detector: its backbone pruned (pyramid width kept), saved and rebuilt from
detector.json's mode record in a fresh process, fine-tuned with pyramid feature distillation; the
recipe train_detection -> prune_detection -> finetune_detection (distilled from the dense one)."""
from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import effvision  # noqa: F401
from effvision.detection import DetectorSpec, build_from_spec, load_detector, save_detector
from effvision.detection.prune import backbone_macs, prune_detector_
from effvision.detection.train import pyramid_mse, train_detector
from effvision.engine.optim import OptimizerConfig
from effvision.errors import ConfigError, EffVisionError
from effvision.models.modes import ModeRuleError, record_of

from conftest import SHARED, cli, needs_shared, tiny_recipe

COCO128 = SHARED / "datasets" / "coco128"
SIZE = (64, 96)  # (H, W): every image here, so the transform (min_size 64, max_size 96) keeps it


def _detector(trunk: str = "resnet10t", kind: str = "fcos", seed: int = 0) -> tuple[nn.Module, DetectorSpec]:
    torch.manual_seed(seed)
    spec = DetectorSpec(kind=kind, backbone={"name": trunk, "num_classes": 0, "img_size": 32 if trunk.endswith("_32")
                                             else 224}, num_classes=3, out_channels=32, min_size=64, max_size=96,
                        options={"representation_size": 64} if kind == "fasterrcnn" else {})
    return build_from_spec(spec).eval(), spec


def _maps(det: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return dict(det.eval().backbone(x))


def _detections(det: nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    det.eval().score_thresh = 0.0  # an untrained head scores low: keep every candidate, so there is something to compare
    with torch.no_grad():
        return det(images)


@pytest.mark.parametrize("trunk", ["resnet10t", "mobilenetv3_small_050", "convnext_atto", "vit_micro_patch4_32"])
def test_pruning_shrinks_the_backbone_and_keeps_the_pyramid_width(trunk: str) -> None:
    det, _ = _detector(trunk)
    head_before = {k: v.clone() for k, v in det.head.state_dict().items()}
    x = torch.rand(1, 3, *SIZE)
    dense_maps = _maps(det, x)
    macs = backbone_macs(det, SIZE)
    report = prune_detector_(det, 0.5)
    assert report["params_after"] < 0.8 * report["params_before"]
    assert report["backbone_params_after"] < 0.8 * report["backbone_params_before"]
    assert backbone_macs(det, SIZE) < 0.8 * macs
    if trunk.startswith("vit"):  # heads and MLP units; the embedding (the simple pyramid's input) is kept
        assert report["maps_after"] == report["maps_before"]
        assert {m.num_heads for m in det.backbone.body.model.modules() if type(m).__name__ == "Attention"} == {1}
    else:  # the trunk's maps (the FPN's inputs) are narrower
        assert all(a < b for a, b in zip(report["maps_after"], report["maps_before"])), report
    # The pyramid the heads read keeps its levels, width and sizes; the heads are untouched.
    pruned_maps = _maps(det, x)
    assert [m.shape for m in pruned_maps.values()] == [m.shape for m in dense_maps.values()]
    assert all(m.shape[1] == 32 for m in pruned_maps.values())
    assert all(torch.equal(v, head_before[k]) for k, v in det.head.state_dict().items())
    out = _detections(det, [torch.rand(3, *SIZE), torch.rand(3, 48, 80)])
    assert len(out) == 2 and all(len(o["boxes"]) > 0 and o["boxes"].shape[1] == 4 for o in out)
    entry = record_of(det)[-1]
    assert entry["mode"] == "prune" and entry["config"] == {"ratio": 0.5, "criterion": "l2", "round_to": 8}
    assert all(name.startswith("backbone.") for name in entry["metadata"]["tensors"])  # relative to the detector


_RELOAD = """
import sys, torch
from effvision.detection import load_detector
det, spec = load_detector(sys.argv[1])
det.eval().score_thresh = 0.0
x = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save({"maps": dict(det.backbone(x["batch"])), "detections": det(x["images"]),
                "modes": [e["mode"] for e in spec.modes]}, sys.argv[3])
"""


def test_pruned_detector_reloads_in_a_fresh_process(tmp_path: Path) -> None:
    det, spec = _detector("resnet10t", "retinanet")
    prune_detector_(det, 0.4, criterion="l1")
    save_detector(det, spec, tmp_path / "det")  # spec.modes is []: the detector's own record is written
    saved = json.loads((tmp_path / "det" / "detector.json").read_text())
    assert [e["mode"] for e in saved["modes"]] == ["prune"]
    torch.manual_seed(1)
    inputs = {"batch": torch.rand(2, 3, *SIZE), "images": [torch.rand(3, *SIZE), torch.rand(3, 72, 90)]}
    torch.save(inputs, tmp_path / "x.pt")
    # The reference: the in-memory pruned detector. The copy: rebuilt from files alone, no pickle of the model.
    ref_maps, ref_dets = _maps(det, inputs["batch"]), _detections(det, inputs["images"])
    proc = subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path / "det"), str(tmp_path / "x.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["modes"] == ["prune"]
    assert all(torch.equal(got["maps"][k], ref_maps[k]) for k in ref_maps)
    for r, g in zip(ref_dets, got["detections"]):
        assert len(r["boxes"]) > 0
        assert torch.equal(r["boxes"], g["boxes"]) and torch.equal(r["scores"], g["scores"])
        assert torch.equal(r["labels"], g["labels"])


def test_old_and_bad_detector_specs(tmp_path: Path) -> None:
    det, spec = _detector("resnet10t")
    save_detector(det, spec, tmp_path / "old")
    path = tmp_path / "old" / "detector.json"
    data = json.loads(path.read_text())
    del data["modes"]  # written before the record existed: a dense detector
    path.write_text(json.dumps(data))
    again, spec2 = load_detector(tmp_path / "old")
    assert spec2.modes == [] and torch.equal(_maps(again, torch.ones(1, 3, *SIZE))["0"],
                                             _maps(det, torch.ones(1, 3, *SIZE))["0"])
    bad = {"no backbone": ({k: v for k, v in data.items() if k != "backbone"}, "no 'backbone' record"),
           "backbone not a dict": ({**data, "backbone": "resnet10t"}, "'backbone' is not a model spec"),
           "backbone without a name": ({**data, "backbone": {"num_classes": 0}}, "'backbone' is not a model spec"),
           "unknown mode": ({**data, "modes": [{"mode": "shrink", "version": 1, "config": {}, "metadata": {}}]},
                            "unknown detector mode 'shrink'"),
           "modes not a list": ({**data, "modes": {"mode": "prune"}}, "'modes' is not a list")}
    for case, (content, text) in bad.items():
        path.write_text(json.dumps(content))
        with pytest.raises(EffVisionError) as e:
            load_detector(tmp_path / "old")
        msg = str(e.value)
        assert str(path) in msg and text in msg and "\n" not in msg, (case, msg)


def test_bad_prune_inputs_are_one_line() -> None:
    det, _ = _detector("resnet10t")
    params = sum(p.numel() for p in det.parameters())
    cases = [(dict(ratio=1.0), ConfigError, "outside"), (dict(ratio=0.0), ConfigError, "outside"),
             (dict(ratio=0.5, criterion="nope"), ConfigError, "unknown pruning criterion 'nope'"),
             (dict(ratio=0.5, criterion="taylor"), ConfigError, "by magnitude"),
             (dict(ratio=0.5, round_to=0), ConfigError, "round_to"),
             (dict(ratio=0.5, example_size=(50, 96)), EffVisionError, "not a multiple")]
    for kwargs, error, text in cases:
        with pytest.raises(error, match=text) as e:
            prune_detector_(det, **kwargs)
        assert "\n" not in str(e.value)
    assert sum(p.numel() for p in det.parameters()) == params and record_of(det) == []  # refusals change nothing
    with pytest.raises(EffVisionError, match="takes an effvision detector"):
        prune_detector_(nn.Sequential(nn.Conv2d(3, 8, 3)), 0.5)


def test_unsupported_trunk_is_one_line() -> None:
    det, _ = _detector("efficientvit_m0")
    with pytest.raises(EffVisionError, match="no handler covers efficientvit_m0") as e:
        prune_detector_(det, 0.5)
    assert "\n" not in str(e.value)


def test_prune_then_sparse_attention_composes_and_the_reverse_is_refused(tmp_path: Path) -> None:
    from effvision.attention import SparseAttentionConfig, sparsify_attention_

    det, spec = _detector("vit_micro_patch4_32")
    prune_detector_(det, 0.4, round_to=None)
    x = torch.rand(2, 3, *SIZE)
    policies = sparsify_attention_(det.backbone, SparseAttentionConfig(block=16, calib_batches=1), [x])
    save_detector(det, dataclasses.replace(spec, attention=policies), tmp_path / "det")
    again, spec2 = load_detector(tmp_path / "det")  # modes first, then the policies of the pruned heads
    assert [e["mode"] for e in spec2.modes] == ["prune"] and spec2.attention is not None
    ref, got = _maps(det, x), _maps(again, x)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    with pytest.raises(ModeRuleError, match="prune cannot follow sparse attention") as e:
        prune_detector_(again, 0.3)
    assert "\n" not in str(e.value)


# ---- fine-tuning with pyramid distillation ------------------------------------------------

def _batches(n: int, seed: int = 0) -> list[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = [torch.rand(3, *SIZE, generator=g) for _ in range(2)]
        targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 36.0], [50.0, 20.0, 90.0, 60.0]]),
                    "labels": torch.tensor([1, 2])} for _ in range(2)]
        out.append((images, targets))
    return out


def test_distillation_loss_zero_for_a_copy_positive_otherwise() -> None:
    student, _ = _detector("convnext_atto")  # no batch norm: train and eval mode compute the same maps
    cpu, frozen = torch.device("cpu"), OptimizerConfig(name="adamw", lr=0.0, weight_decay=0.0)
    same = train_detector(student, _batches(2), epochs=1, optimizer=frozen, device=cpu, progress=False,
                          teacher=copy.deepcopy(student), distill_weight=1.0)
    assert same["distill_losses"] == [0.0, 0.0]
    other, _ = _detector("convnext_atto", seed=1)
    diff = train_detector(student, _batches(2), epochs=1, optimizer=frozen, device=cpu, progress=False,
                          teacher=other, distill_weight=1.0)
    assert min(diff["distill_losses"]) > 0
    plain = train_detector(student, _batches(1), epochs=1, optimizer=frozen, device=cpu, progress=False)
    assert "distill_losses" not in plain and plain["steps"] == 1
    with pytest.raises(EffVisionError, match="teacher is the student itself"):
        train_detector(student, _batches(1), epochs=1, optimizer=frozen, device=cpu, teacher=student)
    with pytest.raises(EffVisionError, match="differ in shape"):
        pyramid_mse({"0": torch.zeros(1, 32, 4, 4)}, {"0": torch.zeros(1, 64, 4, 4)})


def test_distillation_pulls_the_pruned_pyramid_to_the_dense_one() -> None:
    """Eight steps from a pruned copy: the objective (student in training mode, teacher in eval mode,
    as train_detector runs them) falls with distillation and rises without (control: weight 0)."""
    teacher, _ = _detector("resnet10t")
    x = torch.rand(4, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    after = {}
    for weight in (0.0, 20.0):
        student = copy.deepcopy(teacher)
        prune_detector_(student, 0.5)

        def mse() -> float:
            student.train()
            with torch.no_grad():
                return float(pyramid_mse(dict(student.backbone(x)), _maps(teacher, x)))

        before = mse()
        result = train_detector(student, _batches(8), epochs=1, device=torch.device("cpu"), progress=False,
                                optimizer=OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.0),
                                teacher=teacher, distill_weight=weight)
        after[weight] = mse()
        assert len(result["distill_losses"]) == 8
    # measured: 0.61 before; 0.72 after plain training, 0.36 after distillation
    assert after[20.0] < 0.75 * before and after[20.0] < 0.6 * after[0.0], (before, after)


# ---- the recipe --------------------------------------------------------------------------

def _stages(finetune: dict | None = None, prune: dict | None = None) -> list[dict]:
    data = {"root": str(COCO128), "limit_images": 4, "batch_size": 2, "num_workers": 0, "hflip": False}
    return [
        {"type": "train_detection", "detector": "fcos", "out_channels": 32, "epochs": 1, "warmup_steps": 0,
         "min_size": 64, "max_size": 96, "log_every": 1, "data": data},
        {"type": "prune_detection", "ratio": 0.5, "evaluate": True, "data": data, **(prune or {})},
        {"type": "finetune_detection", "epochs": 1, "warmup_steps": 0, "log_every": 1, "data": data,
         "distill": {"teacher": "dense", "weight": 2.0}, **(finetune or {})},
    ]


@needs_shared
def test_recipe_train_prune_finetune_distilled_from_dense(tmp_path: Path) -> None:
    from effvision.pipeline import run_recipe

    recipe = tiny_recipe(tmp_path / "r.yaml", stages=_stages(), model={"name": "resnet10t"})
    run = run_recipe(recipe, tmp_path / "run")
    pruned = json.loads((run / "02-prune_detection" / "summary.json").read_text())
    assert pruned["params_fraction"] < 0.6 and pruned["macs_fraction"] < 0.6 and pruned["macs_size"] == [64, 64]
    assert 0.0 <= pruned["dense"]["bbox_mAP"] <= 1.0 and "bbox_mAP_drop" in pruned
    tuned = json.loads((run / "03-finetune_detection" / "summary.json").read_text())
    assert tuned["teacher_dir"] == str(run / "01-train_detection" / "detector")
    assert tuned["steps"] == 2 and tuned["distill_mse_first"] > 0 and tuned["modes"] == ["prune"]
    steps = [json.loads(line) for line in (run / "03-finetune_detection" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_distill" in s for s in steps)
    p, _ = load_detector(run / "02-prune_detection" / "detector")
    f, spec = load_detector(run / "03-finetune_detection" / "detector")
    assert [e["mode"] for e in spec.modes] == ["prune"]
    assert {k: v.shape for k, v in p.state_dict().items()} == {k: v.shape for k, v in f.state_dict().items()}


@needs_shared
def test_recipe_bad_configs_fail_before_work(tmp_path: Path) -> None:
    not_a_detector = tmp_path / "empty"
    not_a_detector.mkdir()
    cases = {"ratio": (_stages(prune={"ratio": 1.5}), "ratio: 1.5 is outside (0, 1)"),
             "criterion": (_stages(prune={"criterion": "obd"}), "criterion: 'obd' is not one for detectors"),
             "teacher dir": (_stages(finetune={"distill": {"teacher": str(not_a_detector)}}), "is not a detector dir"),
             "dense without prune": ([s for s in _stages() if s["type"] != "prune_detection"], "needs a prune_detection"),
             "no detector": (_stages()[1:], "needs a train_detection stage before it"),
             "prune after sparse attention": (_stages()[:1] + [{"type": "sparse_attention", "data": _stages()[0]["data"]}]
                                              + _stages()[1:], "cannot follow sparse_attention on the detector")}
    for case, (stages, text) in cases.items():
        recipe = tiny_recipe(tmp_path / f"{case}.yaml", stages=stages, model={"name": "resnet10t"})
        proc = cli("run", str(recipe), "--out", str(tmp_path / "run"))
        assert proc.returncode == 2 and text in proc.stderr, (case, proc.stderr[-1500:])
        assert len(proc.stderr.strip().splitlines()) == 1, (case, proc.stderr)
        assert not (tmp_path / "run").exists()
