"""Prune and finetune stages through the CLI, the spec contract in a fresh process,
distillation losses, importance criteria, and the bad inputs the issue lists."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import effvision  # noqa: F401
from effvision.compress import Distilled, DistillLoss, DistillSpec
from effvision.compress.importance import _OBD
from effvision.models.io import ModelSpec, save_model

from conftest import cli, tiny_recipe

TRAIN = {"type": "train", "epochs": 2, "optimizer": {"name": "adamw", "lr": 2.0e-3},
         "scheduler": {"name": "cosine", "warmup_epochs": 1}, "log_every": 4}


def _stages(*extra: dict) -> list[dict]:
    return [TRAIN, *extra]


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train -> prune (taylor, per-kind ratios, round_to 8) -> finetune distilled from 01-train -> export."""
    tmp = tmp_path_factory.mktemp("run")
    recipe = tiny_recipe(tmp / "r.yaml", stages=_stages(
        {"type": "prune", "criterion": "taylor", "heads": 0.3, "mlp": 0.5, "width": 0.25, "round_to": 8,
         "calib_batches": 2},
        {"type": "finetune", "epochs": 1, "optimizer": {"name": "adamw", "lr": 1.0e-3}, "log_every": 4,
         "distill": {"teacher": "01-train", "kind": "soft", "alpha": 1.0, "feature_weight": 0.5}},
        {"type": "export", "parity_batch_sizes": [2]}))
    r = cli("run", str(recipe), "--out", str(tmp / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp / "out"


def test_prune_stage_shrinks_and_records_the_architecture(compressed_run: Path) -> None:
    report = json.loads((compressed_run / "02-prune" / "prune.json").read_text())
    assert report["macs_fraction"] < 0.6 and report["params_fraction"] < 0.6
    spec = json.loads((compressed_run / "02-prune" / "model" / "model.json").read_text())
    assert [m["mode"] for m in spec["modes"]] == ["prune"]
    pruned = spec["modes"][0]["metadata"]
    assert pruned["attrs"]["blocks.0.attn"]["num_heads"] == 2
    assert pruned["attrs"][""]["embed_dim"] == 72  # 96 * 0.75, a multiple of 8
    assert pruned["tensors"]["blocks.0.mlp.fc1.weight"] == [96, 72]
    finetune = json.loads((compressed_run / "03-finetune" / "summary.json").read_text())
    assert finetune["distill"] == "soft" and finetune["top1"] > 0
    parity = json.loads((compressed_run / "04-export" / "summary.json").read_text())["parity"]
    assert parity["max_abs_error"] <= 1e-4


def test_pruned_model_loads_in_a_fresh_process(compressed_run: Path) -> None:
    """The contract quantization and detection rely on: load_model gives a plain timm model."""
    code = f"""
import torch
from effvision.models.io import load_model
model, spec = load_model({str(compressed_run / '03-finetune' / 'model')!r})
model.eval()
x = torch.randn(3, 3, 32, 32)
final, maps = model.forward_intermediates(x)
assert model(x).shape == (3, 10), model(x).shape
assert torch.allclose(model.forward_head(model.forward_features(x)), model(x))
assert [m.shape[1] for m in maps] == [72] * 4
assert all(b.attn.fused_attn and b.attn.num_heads == 2 for b in model.blocks)
print("ok", [m["mode"] for m in spec.modes] == ["prune"])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ok True"


# ---- bad input: one line, exit 2, before any work (no run directory) ---------------------------

@pytest.mark.parametrize("prune,message", [
    ({"ratio": 1.5}, "stages[1].ratio: 1.5 is outside (0, 1)"),
    ({"ratio": 0.3, "ignore": ["blocks.7.mlp"]}, "no module named blocks.7.mlp"),
    ({"budget": {"metric": "params", "fraction": 0.05}, "budget_kinds": ["mlp"]}, "cannot be reached"),
    ({"criterion": "magic", "ratio": 0.3}, "unknown 'magic'"),
    ({"budget": {"metric": "latency", "fraction": 0.5, "allocation": "halp"}, "budget_kinds": ["channels"]},
     "allocation halp allocates heads, mlp, width, depth, not channels"),
], ids=["ratio", "ignored", "budget", "criterion", "halp"])
def test_bad_prune_config_fails_before_work(tmp_path: Path, prune: dict, message: str) -> None:
    recipe = tiny_recipe(tmp_path / "r.yaml", stages=_stages({"type": "prune", **prune}))
    r = cli("run", str(recipe), "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr[-1000:]
    assert message in r.stderr
    assert not (tmp_path / "out").exists()


def test_uncovered_family_fails_before_work(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "r.yaml", model={"name": "efficientvit_m0", "kwargs": {"img_size": 32}},
                         stages=_stages({"type": "prune", "ratio": 0.3}))
    r = cli("run", str(recipe), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "no handler covers efficientvit_m0" in r.stderr
    assert not (tmp_path / "out").exists()


def test_teacher_must_be_an_earlier_stage(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "r.yaml", stages=_stages(
        {"type": "finetune", "epochs": 1, "distill": {"teacher": "03-train"}}))
    r = cli("run", str(recipe), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "'03-train' is not an earlier stage" in r.stderr
    assert not (tmp_path / "out").exists()


def test_teacher_with_other_classes_is_refused(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    save_model(timm.create_model("vit_micro_patch4_32", num_classes=5), ModelSpec("vit_micro_patch4_32", num_classes=5),
               teacher)
    recipe = tiny_recipe(tmp_path / "r.yaml", stages=[
        {"type": "finetune", "epochs": 1, "distill": {"teacher": str(teacher)}}])
    r = cli("run", str(recipe), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "predicts 5 classes" in r.stderr and "the student 10" in r.stderr
    assert not (tmp_path / "out" / "01-finetune" / "model").exists()


# ---- distillation losses ---------------------------------------------------------------------------

def test_soft_distillation_is_zero_for_the_teacher_itself() -> None:
    torch.manual_seed(0)
    teacher = timm.create_model("vit_micro_patch4_32", num_classes=10).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    spec = DistillSpec(kind="soft", temperature=3.0)
    term = DistillLoss(teacher, Distilled(teacher, teacher, spec, (3, 32, 32)), spec)
    with torch.no_grad():
        same = term(teacher, x, y, teacher(x))["distill"]
        other = term(teacher, x, y, torch.randn(4, 10))["distill"]
    assert abs(float(same)) < 1e-6 and float(other) > 0.01


def test_hard_and_feature_distillation_train_the_projection() -> None:
    torch.manual_seed(0)
    teacher = timm.create_model("vit_tiny_patch4_32", num_classes=10)   # width 192
    student = timm.create_model("vit_micro_patch4_32", num_classes=10)  # width 96
    spec = DistillSpec(kind="hard", alpha=1.0, feature_weight=1.0)
    wrapped = Distilled(student, teacher, spec, (3, 32, 32))
    assert wrapped.proj.in_features == 96 and wrapped.proj.out_features == 192
    term = DistillLoss(teacher, wrapped, spec)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits = wrapped(x)
    terms = term(wrapped, x, y, logits)
    with torch.no_grad():
        expected = F.cross_entropy(logits, teacher.eval()(x).argmax(-1))
    torch.testing.assert_close(terms["distill"].detach(), expected)
    sum(terms.values()).backward()
    assert wrapped.proj.weight.grad is not None and student.patch_embed.proj.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    assert set(wrapped.no_weight_decay()) >= {"student.pos_embed", "student.cls_token"}


def test_token_distillation_uses_the_distillation_head() -> None:
    torch.manual_seed(0)
    kw = {"img_size": 32, "depth": 1, "num_classes": 10}
    student = timm.create_model("deit_tiny_distilled_patch16_224", **kw)
    teacher = timm.create_model("vit_micro_patch4_32", num_classes=10)
    spec = DistillSpec(kind="token", alpha=1.0)
    term = DistillLoss(teacher, Distilled(student, teacher, spec, (3, 32, 32)), spec)
    x = torch.randn(2, 3, 32, 32)
    logits = student.train()(x)  # average of both heads (timm's default outside distilled training)
    terms = term(student, x, torch.zeros(2, dtype=torch.long), logits)
    dist_logits = term._dist_out.value
    with torch.no_grad():
        expected = F.cross_entropy(dist_logits, teacher.eval()(x).argmax(-1))
    torch.testing.assert_close(terms["distill"].detach(), expected)


# ---- importance ------------------------------------------------------------------------------------

def test_obd_accumulates_every_sample() -> None:
    """Torch-Pruning 1.6.1 keeps only the last sample's squared gradient; ours sums them."""
    lin = torch.nn.Linear(3, 2)
    imp = _OBD()
    grads = []
    for i in range(3):
        lin.zero_grad()
        (lin(torch.full((1, 3), float(i + 1))).sum()).backward()
        grads.append(lin.weight.grad.clone())
        imp.accumulate_grad(lin)
    torch.testing.assert_close(imp._accu_grad[lin.weight], sum(g.pow(2) for g in grads))
    assert imp._counter[lin.weight] == 3


def test_macs_budget_search_lands_just_under_the_budget() -> None:
    from effvision.compress.budget import BudgetSpec, search_ratio
    from effvision.compress.prune import PruneSpec, model_macs_params, prune_

    model = timm.create_model("vit_micro_patch4_32", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    ratio, achieved = search_ratio(model, x, ["heads", "mlp", "width"], BudgetSpec(metric="macs", fraction=0.5),
                                   PruneSpec(), tries=5)
    dense_macs, _ = model_macs_params(model, x[:1])
    prune_(model, PruneSpec(ratios={"heads": ratio, "mlp": ratio, "width": ratio}, criterion="l2"), x)
    macs, _ = model_macs_params(model, x[:1])
    assert 0.4 < macs / dense_macs <= 0.5
    assert macs / dense_macs == pytest.approx(achieved)


def test_teacher_gets_its_own_size_and_normalization(tmp_path: Path) -> None:
    """A teacher trained at 48x48 with ImageNet normalization, a 32x32 student normalized with 0.5/0.5:
    the teacher sees the raw image prepared as in its own training, not the student's tensor."""
    from effvision.compress.teacher import TeacherInput, resolve_teacher

    torch.manual_seed(0)
    t_spec = ModelSpec(name="vit_micro_patch4_32", kwargs={"img_size": 48}, img_size=48,
                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    save_model(timm.create_model("vit_micro_patch4_32", num_classes=10, img_size=48), t_spec, tmp_path / "teacher")
    s_spec = ModelSpec(name="vit_micro_patch4_32")  # 32x32, mean/std 0.5
    teacher, got = resolve_teacher(str(tmp_path / "teacher"), None, s_spec)
    assert (got.img_size, tuple(got.mean)) == (48, (0.485, 0.456, 0.406))
    raw = torch.rand(2, 3, 32, 32)                   # images in [0, 1]
    x = (raw - 0.5) / 0.5                            # the student's batch
    mean, std = torch.tensor(t_spec.mean).view(1, 3, 1, 1), torch.tensor(t_spec.std).view(1, 3, 1, 1)
    expected = (F.interpolate(raw, size=(48, 48), mode="bilinear", align_corners=False) - mean) / std
    adapt = TeacherInput(s_spec, got)
    torch.testing.assert_close(adapt(x), expected, atol=1e-5, rtol=1e-5)
    spec = DistillSpec(kind="hard", alpha=1.0, feature_weight=1.0)
    student = timm.create_model("vit_micro_patch4_32", num_classes=10)
    wrapped = Distilled(student, teacher, spec, (3, 32, 32), (3, 48, 48))
    term = DistillLoss(teacher, wrapped, spec, adapt)
    terms = term(wrapped, x, torch.zeros(2, dtype=torch.long), wrapped(x))
    with torch.no_grad():
        expected_loss = F.cross_entropy(wrapped(x), teacher.eval()(expected).argmax(-1))
    torch.testing.assert_close(terms["distill"].detach(), expected_loss)
    assert TeacherInput(s_spec, s_spec).identity


def test_timm_teacher_gets_its_default_input_size() -> None:
    """A timm name at its own resolution (deit_tiny: 224, ImageNet mean/std) teaches a 32x32 student."""
    from effvision.compress.teacher import TeacherInput, resolve_teacher

    teacher, got = resolve_teacher("deit_tiny_patch16_224", None, ModelSpec(name="vit_micro_patch4_32"))
    assert got.img_size == 224 and got.mean == pytest.approx((0.485, 0.456, 0.406))
    with torch.no_grad():
        assert teacher.eval()(TeacherInput(ModelSpec(name="vit_micro_patch4_32"), got)(torch.randn(1, 3, 32, 32))).shape == (1, 10)


def test_unknown_names_get_suggestions_from_every_timm_model() -> None:
    from effvision.compress.teacher import teacher_source
    from effvision.errors import EffVisionError

    with pytest.raises(EffVisionError, match="did you mean vit_tiny_patch16_224"):
        teacher_source("vit_tiny_patch16_2244", None)


def test_latency_search_rerun_reads_the_machine_table_and_gives_the_same_ratio() -> None:
    """A latency budget is measured round-robin against dense, once per machine: a rerun reads the
    table (no clock) and lands on the same architecture."""
    from effvision.compress.budget import BudgetSpec, LatencyTable, search_ratio
    from effvision.compress.prune import PruneSpec

    model = timm.create_model("vit_micro_patch4_32", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    budget = BudgetSpec(metric="latency", backend="torch", fraction=0.7, batch_size=16, iters=2, rounds=3)
    kinds = ["heads", "mlp", "width"]
    first_table = LatencyTable.for_search(model, x, kinds, budget, PruneSpec())
    assert not first_table.reused
    first = search_ratio(model, x, kinds, budget, PruneSpec(), tries=3, table=first_table)
    assert first_table.path.is_file() and len(first_table.entries) == 4  # max_ratio + 3 bisection steps
    stamp = first_table.path.stat().st_mtime_ns
    again_table = LatencyTable.for_search(model, x, kinds, budget, PruneSpec())
    assert again_table.reused and again_table.path == first_table.path
    assert search_ratio(model, x, kinds, budget, PruneSpec(), tries=3, table=again_table) == first
    assert first_table.path.stat().st_mtime_ns == stamp  # nothing was measured again
    first_table.path.write_text("{not json")              # a damaged table is measured anew, not trusted
    assert not LatencyTable.for_search(model, x, kinds, budget, PruneSpec()).reused


def test_cached_teacher_logits_train_like_the_live_teacher(tmp_path: Path) -> None:
    """distill.cache_logits: the teacher runs once over the training set (cached in RUN/distill) and each
    step looks its batch up by sample index; with augmentation off that is exactly the live teacher,
    so the distilled students end the same. A second finetune reuses the cache file."""
    from safetensors.torch import load_file

    from effvision.pipeline import run_recipe

    def recipe(name: str, cache: bool) -> Path:
        ft = {"type": "finetune", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.05}, "log_every": 4,
              "distill": {"teacher": "01-train", "kind": "soft", "alpha": 1.0, "temperature": 2.0,
                          "cache_logits": cache}}
        return tiny_recipe(tmp_path / f"{name}.yaml", data={"augment": {"crop_padding": 0, "hflip": False},
                                                             "limit_train": 256},
                           stages=[{**TRAIN, "epochs": 1}, ft, *([ft] if cache else [])])

    run_recipe(recipe("live", False), tmp_path / "live")
    run_recipe(recipe("cached", True), tmp_path / "cached")
    caches = list((tmp_path / "cached" / "distill").glob("logits-*.safetensors"))
    assert len(caches) == 1 and load_file(str(caches[0]))["logits"].shape == (256, 10)
    live = load_file(str(tmp_path / "live" / "02-finetune" / "model" / "model.safetensors"))
    cached = load_file(str(tmp_path / "cached" / "02-finetune" / "model" / "model.safetensors"))
    for k in live:
        torch.testing.assert_close(cached[k], live[k], atol=1e-5, rtol=1e-4)
    # the second finetune (teacher 01-train again) found the same file instead of a new one
    assert list((tmp_path / "cached" / "distill").glob("logits-*.safetensors")) == caches


def test_cached_logits_refuse_feature_distillation(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "r.yaml", stages=_stages(
        {"type": "finetune", "epochs": 1, "distill": {"teacher": "01-train", "feature_weight": 0.5,
                                                       "cache_logits": True}}))
    r = cli("run", str(recipe), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "cache_logits" in r.stderr and "feature_weight" in r.stderr
    assert not (tmp_path / "out").exists()
