"""random-LTD: exact when nothing is dropped, identity for dropped tokens, reproducible
subsets, inert in eval, resume-exact, and a dense export; the budget clock; bad input."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import effvision.models  # noqa: F401  (registers vit_*_patch4_32)
from conftest import cli, tiny_recipe
from test_resume import _start_and_kill
from effvision.engine import Hooks
from effvision.errors import ConfigError
from effvision.tokens import TokenDropConfig, apply_token_drop, kept_tokens, remove_token_drop
from effvision.tokens.random_ltd import layer_token_clock


def _pair(name: str, **kw: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    dense = timm.create_model(name, **kw)
    ltd = timm.create_model(name, **kw)
    ltd.load_state_dict(dense.state_dict())
    return dense, ltd


@pytest.mark.parametrize("name,kw", [
    ("vit_micro_patch4_32", {}),
    ("convvit_tiny_32", {}),
    ("deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 3, "embed_dim": 64, "num_heads": 2}),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 3, "embed_dim": 64, "num_heads": 2,
                              "reg_tokens": 2, "class_token": True}),
])
def test_all_tokens_kept_equals_dense(name: str, kw: dict) -> None:
    dense, ltd = _pair(name, **kw)
    hooks = Hooks()
    apply_token_drop(ltd, TokenDropConfig(start_tokens=1), hooks, seed=0)
    assert ltd.state_dict().keys() == dense.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    dense.train(), ltd.train()
    hooks.before_step[0](ltd, 10 ** 6, 10)  # past the schedule: every token kept
    torch.manual_seed(1)
    a = dense(x)
    torch.manual_seed(1)
    b = ltd(x)
    assert torch.allclose(a, b, atol=1e-6)
    # The gather/scatter path itself, with every patch index: outputs and gradients as dense.
    prefix, blk_d, blk_l = ltd.num_prefix_tokens, dense.blocks[1], ltd.blocks[1]
    blk_d.eval(), blk_l.eval()  # no drop_path randomness
    h = torch.randn(2, prefix + ltd.patch_embed.num_patches, ltd.embed_dim, requires_grad=True)
    h2 = h.detach().clone().requires_grad_(True)
    idx = torch.arange(prefix, h.shape[1]).expand(2, -1)
    yd, yl = blk_d(h), blk_l.forward_subset(h2, idx)
    assert torch.allclose(yd, yl, atol=1e-6)
    g = torch.randn_like(yd)
    yd.backward(g), yl.backward(g)
    assert torch.allclose(h.grad, h2.grad, atol=1e-6)
    for (n, p), q in zip(blk_d.named_parameters(), blk_l.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_dropped_tokens_pass_through_and_prefix_is_kept() -> None:
    _, ltd = _pair("deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, depth=3, embed_dim=64, num_heads=2)
    hooks = Hooks()
    apply_token_drop(ltd, TokenDropConfig(start_tokens=8, schedule_steps=100), hooks, seed=3)
    ltd.train()
    hooks.before_step[0](ltd, 0, 200)
    blk = ltd.blocks[1]
    h = torch.randn(4, 2 + 64, 64, requires_grad=True)
    y = blk(h)
    changed = (y - h).abs().amax(-1) > 0                   # (B, N)
    assert changed[:, :2].all()                             # CLS and distillation tokens always processed
    assert (changed[:, 2:].sum(1) == 8).all()               # 8 patch tokens per sample
    assert not torch.equal(changed[0], changed[1])          # drawn per sample
    y.sum().backward()
    assert torch.equal(h.grad[~changed], torch.ones_like(h.grad[~changed]))  # identity backward
    # Same (seed, step, layer): same subset; evaluation never drops.
    assert torch.equal(blk(h), y)
    blk.eval()
    assert (((blk(h) - h).abs().amax(-1) > 0).sum(1) == 66).all()
    # DDP: another rank draws another subset, reproducibly; another step too.
    from effvision.tokens.random_ltd import _subset
    state = blk._ltd
    first = _subset(state, 1, 4, 64, torch.device("cpu"))
    state.rank = 1
    assert not torch.equal(first, _subset(state, 1, 4, 64, torch.device("cpu")))
    assert torch.equal(_subset(state, 1, 4, 64, torch.device("cpu")), _subset(state, 1, 4, 64, torch.device("cpu")))
    state.rank, state.step = 0, 1
    assert not torch.equal(first, _subset(state, 1, 4, 64, torch.device("cpu")))
    remove_token_drop(ltd)
    assert type(ltd.blocks[1]) is timm.models.vision_transformer.Block


def test_schedule_is_monotonic_bucketed_and_layer_token_clock() -> None:
    cfg = TokenDropConfig(start_tokens=16, schedule_steps=90, buckets=4)
    ks = [kept_tokens(cfg, 64, s, 200) for s in range(200)]
    assert ks[0] == 16 and ks[-1] == 64 and ks == sorted(ks) and len(set(ks)) == 4
    clock = layer_token_clock(cfg, 64, 4, 2)
    pos = [clock(s, 200) for s in range(201)]
    assert pos[0] == 0 and pos[-1] == 200 and pos == sorted(pos)
    assert pos[40] < 40  # early steps consume fewer layer-tokens than dense steps


def test_bad_input_names_the_key() -> None:
    m = timm.create_model("vit_micro_patch4_32")
    for cfg, key in [(TokenDropConfig(layers=[7]), "layers"), (TokenDropConfig(start_tokens=65), "start_tokens")]:
        with pytest.raises(ConfigError, match=key):
            apply_token_drop(m, cfg, Hooks(), seed=0)
    with pytest.raises(ConfigError, match="no transformer blocks"):
        apply_token_drop(timm.create_model("resnet18", num_classes=10), TokenDropConfig(), Hooks(), seed=0)
    with pytest.raises(ConfigError, match="start_tokens"):
        TokenDropConfig(start_tokens=0).validate("token_drop")


def test_recipe_token_drop_resume_exact_and_dense_export(tmp_path: Path) -> None:
    """SIGKILL + --resume with random-LTD and layer-token LR ends bit-identical; the model is dense."""
    train = {"epochs": 3, "checkpoint_every": 3, "log_every": 2, "eval_every": 0,
             "token_drop": {"start_tokens": 16, "schedule_steps": 8, "layer_token_lr": True}}
    small = {"model": {"name": "vit_micro_patch4_32", "kwargs": {"depth": 3}},
             "data": {"name": "digits", "batch_size": 64, "limit_train": 256, "limit_eval": 64,
                      "augment": {"crop_padding": 2, "hflip": False}}}
    recipe = tiny_recipe(tmp_path / "r.yaml", train=train, **small)
    clean = tmp_path / "clean"
    r = cli("run", str(recipe), "--out", str(clean))
    assert r.returncode == 0, r.stderr
    assert "blocks [1] keep 16..64 of 64 patch tokens; 4 distinct token counts [16, 32, 48, 64]" in r.stdout
    killed = tmp_path / "killed"
    _start_and_kill(recipe, killed, after_step=0, resume=False)
    assert cli("run", str(recipe), "--out", str(killed), "--resume").returncode == 0
    a = load_file(str(clean / "01-train" / "model" / "model.safetensors"))
    b = load_file(str(killed / "01-train" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Dropping changed training (not a dense run under another name).
    dense = tiny_recipe(tmp_path / "d.yaml", train={k: v for k, v in train.items() if k != "token_drop"}, **small)
    assert cli("run", str(dense), "--out", str(tmp_path / "dense")).returncode == 0
    d = load_file(str(tmp_path / "dense" / "01-train" / "model" / "model.safetensors"))
    assert any(not torch.equal(a[k], d[k]) for k in a)
    # The exported model is the plain dense timm model, parity-checked.
    r = cli("export", str(clean), "--out", str(tmp_path / "onnx"))
    assert r.returncode == 0, r.stderr


class _FakeClock:
    """An injected clock: every reading advances 0.5 s, so each training step costs 0.5 s."""
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.5
        return self.t


def test_budget_stops_at_the_budget_on_an_injected_clock(tmp_path: Path) -> None:
    from effvision.data import AugmentConfig, DataConfig, build_loaders
    from effvision.engine import SchedulerConfig, TrainConfig, Trainer
    loaders = build_loaders(DataConfig(name="digits", batch_size=64, limit_train=256, limit_eval=64,
                                       augment=AugmentConfig(crop_padding=2, hflip=False)),
                            device=torch.device("cpu"), seed=0, mean=(0.5,) * 3, std=(0.5,) * 3)
    cfg = TrainConfig(epochs=100, budget_s=3.0, eval_every=1, scheduler=SchedulerConfig(name="onecycle"))
    torch.manual_seed(0)
    trainer = Trainer(timm.create_model("vit_micro_patch4_32", depth=2), cfg, loaders, device=torch.device("cpu"),
                      out_dir=tmp_path, num_classes=10, progress=False, timer=_FakeClock())
    lrs: list[float] = []
    trainer.hooks.before_step.append(lambda m, s, t: lrs.append(trainer.schedule_position(s)))
    result = trainer.fit()
    m = result.metrics
    # 0.5 s per step; evaluation and checkpoints read the clock too but are not charged: 6 steps.
    assert m["steps_done"] == 6 and m["budget_used_s"] == 3.0
    assert m["eval_time_s"] > 0 and m["checkpoint_time_s"] > 0
    # The schedule follows the clock: position = spent fraction of the budget x total steps.
    assert lrs == [i / 6 * trainer.total_steps for i in range(6)]
    with pytest.raises(ConfigError, match="budget_s"):
        TrainConfig(budget_s=0).validate("stages[0]")


def test_gpu_bench_token_drop_section_runs_at_toy_size(tmp_path: Path) -> None:
    """The gpu_bench section end to end on a digits slice on the CPU, so a typo never wastes a GPU call."""
    import argparse

    from effvision.tokens.gpu_section import token_drop_markdown, token_drop_section
    args = argparse.Namespace(data="", runs=str(tmp_path), stamp="t", toy=True)
    rows = token_drop_section(args)
    variants = [r["variant"] for r in rows]
    assert variants == ["dense", "random-LTD", "dense 0.5s", "random-LTD 0.5s", "curriculum 0.5s",
                        "random-LTD+curriculum 0.5s", "time to dense accuracy"]
    assert all(r.get("exit_code", 0) == 0 for r in rows)
    # the budget, not the (16-step) epoch bound, ended training
    assert rows[2]["budget_s"] == 0.5 and rows[2]["train_time_s"] >= 0.5 and rows[2]["steps_done"] < 16
    assert (tmp_path / "token_drop-t.png").stat().st_size > 0
    assert rows[4]["budget_s"] == 0.5 and rows[4]["top1"] is not None  # the curriculum runs trained and evaluated
    assert any("random-LTD+curriculum" in line for line in token_drop_markdown(rows))


def test_token_drop_composes_with_galore_bf16_accumulation_distillation_and_compile(tmp_path: Path) -> None:
    """random-LTD beside the rest of training: a GaLore optimizer, bf16 autocast and gradient
    accumulation in train; then a compiled, distilled finetune (the teacher is the dense train
    output), whose compiled shapes are the printed token buckets."""
    drop = {"start_tokens": 32, "schedule_steps": 6, "buckets": 2}
    stages = [
        {"type": "train", "epochs": 2, "log_every": 2, "eval_every": 0, "amp": "bf16", "grad_accum_steps": 2,
         "optimizer": {"name": "galore_adamw", "lr": 2.0e-3, "rank": 8, "update_proj_gap": 4},
         "token_drop": drop},
        {"type": "finetune", "epochs": 1, "log_every": 2, "eval_every": 0, "compile": True,
         "optimizer": {"name": "adamw", "lr": 5.0e-4},
         "distill": {"teacher": "01-train", "kind": "soft"}, "token_drop": drop},
    ]
    recipe = tiny_recipe(tmp_path / "r.yaml", stages=stages, model={"name": "vit_micro_patch4_32",
                                                                    "kwargs": {"depth": 3}},
                         data={"limit_train": 256, "limit_eval": 64})
    r = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("2 distinct token counts [32, 64]") == 2  # the shapes compile can meet
    import json
    import math

    tuned = json.loads((tmp_path / "run" / "02-finetune" / "summary.json").read_text())
    assert tuned["distill"] == "soft"
    for stage in ("01-train", "02-finetune"):  # every logged loss finite: nothing diverged on the way
        lines = (tmp_path / "run" / stage / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line)["loss"] for line in lines if '"eval"' not in line]
        assert losses and all(math.isfinite(v) for v in losses)
    # Both saved models are the plain dense timm model (the transform does not persist).
    model = load_file(str(tmp_path / "run" / "02-finetune" / "model" / "model.safetensors"))
    assert not any("ltd" in k for k in model)


def test_each_layer_draws_its_own_sorted_subset_in_one_forward() -> None:
    """docs/data-efficient-training.md: the kept indices are drawn per sample and per layer and kept
    in their order. In one training forward every dropping block processes exactly the kept count (seen from outside:
    the tokens its output changed), the indices it gathers are sorted, and the layers' subsets
    differ and overlap as independent draws do (16 of 64 twice: 16 * 16 / 64 = 4 on average)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_micro_patch4_32", num_classes=10)
    hooks = Hooks()
    apply_token_drop(model, TokenDropConfig(start_tokens=16, schedule_steps=100, layers=[0, 1, 2, 3]), hooks, seed=5)
    model.train()
    hooks.before_step[0](model, 0, 200)
    prefix, keep = model.num_prefix_tokens, 16
    gathered: dict[int, torch.Tensor] = {}
    changed: dict[int, torch.Tensor] = {}
    for i, blk in enumerate(model.blocks):
        def record(x: torch.Tensor, idx: torch.Tensor, i: int = i, inner=blk.forward_subset) -> torch.Tensor:
            gathered[i] = idx - prefix
            return inner(x, idx)
        blk.forward_subset = record
        blk.register_forward_hook(lambda m, args, out, i=i: changed.__setitem__(i, (out - args[0]).abs().amax(-1) > 0))
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    subsets = []
    for i in range(4):
        assert changed[i][:, :prefix].all() and (changed[i][:, prefix:].sum(1) == keep).all()
        idx = gathered[i]
        assert bool((idx[:, 1:] > idx[:, :-1]).all()), f"layer {i} gathers its tokens out of order"
        assert torch.equal(torch.zeros_like(changed[i][:, prefix:]).scatter_(1, idx, True), changed[i][:, prefix:])
        subsets.append([set(row.tolist()) for row in idx])
    overlaps = [len(subsets[a][b] & subsets[c][b]) for a in range(4) for c in range(a + 1, 4) for b in range(8)]
    assert max(overlaps) < keep, "two layers processed the same tokens of an image"
    assert 2.5 < sum(overlaps) / len(overlaps) < 5.5, overlaps
