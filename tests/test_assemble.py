"""Deep Model Assembling: incubation freezes all but its module, modules assemble into the
target, and mismatched or missing modules are refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import cli, tiny_recipe
from effvision.assemble.modules import (assemble_modules, incubation_model, meta_spec, module_blocks, save_module,
                                        spec_hash)
from effvision.errors import EffVisionError
from effvision.assemble.modules import weights_hash
from effvision.models.io import ModelSpec, create_model, save_model

TARGET = ModelSpec(name="vit_micro_patch4_32", kwargs={})  # 4 blocks


def _modules(tmp_path: Path, meta_seed: int = 0) -> tuple[list[Path], list[torch.nn.Module]]:
    """Two incubated modules (weights perturbed as if trained) of one meta model, saved as dirs."""
    torch.manual_seed(meta_seed)
    mspec = meta_spec(TARGET, 2)
    meta = create_model(mspec)
    meta_dir = save_model(meta, mspec, tmp_path / f"meta{meta_seed}")
    dirs, models = [], []
    for i in range(2):
        model, spec = incubation_model(meta, TARGET, 2, i, seed=0)
        assert spec.kwargs["depth"] == 3  # K - 1 meta blocks + n = 2 target blocks
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        dirs.append(save_module(model, TARGET, 2, i, weights_hash(meta_dir), tmp_path / f"m{meta_seed}-{i}"))
        models.append(model)
    return dirs, models


def test_incubation_freezes_all_but_its_module() -> None:
    meta = create_model(meta_spec(TARGET, 2))
    for i, (blocks, embed, head) in enumerate([((0, 1), True, False), ((1, 2), False, True)]):
        model, _ = incubation_model(meta, TARGET, 2, i, seed=0)
        trainable = {k for k, p in model.named_parameters() if p.requires_grad}
        assert {int(k.split(".")[1]) for k in trainable if k.startswith("blocks.")} == set(blocks)
        assert ("pos_embed" in trainable) == embed and ("head.weight" in trainable) == head
        # the frozen meta block is the meta model's own
        other = 2 if i == 0 else 0
        torch.testing.assert_close(model.blocks[other].mlp.fc1.weight, meta.blocks[1 - i].mlp.fc1.weight)


def test_modules_assemble_into_the_target(tmp_path: Path) -> None:
    dirs, (m0, m1) = _modules(tmp_path)
    copied = [shutil.copytree(d, tmp_path / "elsewhere" / d.name) for d in dirs]  # trained anywhere, copied
    model, spec, info = assemble_modules(copied[::-1])
    assert spec_hash(spec) == spec_hash(TARGET) and len(model.blocks) == 4 and info["modules"] == 2
    sd = model.state_dict()
    torch.testing.assert_close(sd["blocks.1.attn.qkv.weight"], m0.state_dict()["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(sd["blocks.2.attn.qkv.weight"], m1.state_dict()["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(sd["blocks.3.mlp.fc2.weight"], m1.state_dict()["blocks.2.mlp.fc2.weight"])
    torch.testing.assert_close(sd["pos_embed"], m0.state_dict()["pos_embed"])
    torch.testing.assert_close(sd["head.weight"], m1.state_dict()["head.weight"])


def test_bad_modules_are_refused(tmp_path: Path) -> None:
    dirs, _ = _modules(tmp_path, meta_seed=0)
    other, _ = _modules(tmp_path, meta_seed=1)
    with pytest.raises(EffVisionError, match="modules differ in meta_hash"):
        assemble_modules([dirs[0], other[1]])
    with pytest.raises(EffVisionError, match=r"missing \[1\]"):
        assemble_modules([dirs[0]])
    with pytest.raises(EffVisionError, match=r"duplicated \[0\]"):
        assemble_modules([dirs[0], dirs[0]])
    wide = ModelSpec(name="vit_micro_patch4_32", kwargs={"mlp_ratio": 3.0})
    meta = create_model(meta_spec(wide, 2))
    model, _ = incubation_model(meta, wide, 2, 1, seed=0)
    info = json.loads((dirs[0] / "module.json").read_text())
    odd = save_module(model, wide, 2, 1, info["meta_hash"], tmp_path / "odd")
    with pytest.raises(EffVisionError, match="modules differ in target_hash"):
        assemble_modules([dirs[0], odd])
    with pytest.raises(EffVisionError, match="modules: 3 does not divide the target's 4 blocks"):
        module_blocks(4, 3)
    with pytest.raises(EffVisionError, match="module: 2 is out of range"):
        incubation_model(meta, wide, 2, 2, seed=0)


@pytest.mark.slow
def test_meta_incubate_assemble_finetune_recipe(tmp_path: Path) -> None:
    train = {"epochs": 1, "optimizer": {"name": "adamw", "lr": 2.0e-3}, "log_every": 2}
    stages = [{"type": "meta", "modules": 2, **train},
              {"type": "incubate", "modules": 2, "module": 0, **train},
              {"type": "incubate", "modules": 2, "module": 1, **train},
              {"type": "assemble"}, {"type": "finetune", **train}]
    recipe = tiny_recipe(tmp_path / "r.yaml", stages=stages, data={"limit_train": 128, "limit_eval": 64})
    run = tmp_path / "run"
    r = cli("run", str(recipe), "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((run / "01-meta" / "summary.json").read_text())
    inc = [json.loads((run / f"0{i}-incubate" / "summary.json").read_text()) for i in (2, 3)]
    asm = json.loads((run / "04-assemble" / "summary.json").read_text())
    assert inc[0]["meta_hash"] == inc[1]["meta_hash"] == meta["meta_hash"] == asm["meta_hash"]
    assert json.loads((run / "05-finetune" / "model" / "model.json").read_text())["kwargs"] == {}
    assert (run / "05-finetune" / "summary.json").is_file()

    # bad input fails before any work (the module index is checked the same way: preflight)
    recipe = tiny_recipe(tmp_path / "bad.yaml", stages=[stages[0], {**stages[1], "modules": 3}])
    r = cli("run", str(recipe), "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "modules: 3 does not divide the target's 4 blocks" in r.stderr, r.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_gpu_section_runs_at_toy_size(tmp_path: Path) -> None:
    """The gpu_bench section's plumbing on the CPU (digits, a 2-block target, K = 2)."""
    import argparse

    from effvision.assemble.gpu_section import assemble_markdown, assemble_section

    rows = assemble_section(argparse.Namespace(data="unused", runs=str(tmp_path), stamp="t", toy=True))
    assert [r["variant"] for r in rows] == ["end to end", "assembled K=2"]
    assert all(r["exit_code"] == 0 and r["top1"] is not None for r in rows), rows
    assert 0.7 < rows[1]["compute"] < 1.3 and rows[1]["wall_k_machines_s"] <= rows[1]["train_s"]
    assert "assembled K=2" in "\n".join(assemble_markdown(rows))


@pytest.mark.slow
def test_incubate_killed_and_resumed_is_bit_exact(tmp_path: Path) -> None:
    """An incubation job SIGKILLed mid-stage (a real `effvision run` subprocess) and resumed with
    --resume leaves the same module weights, bit for bit, as an uninterrupted job."""
    from safetensors.torch import load_file

    from effvision.models.io import WEIGHTS_FILE, load_model
    from test_resume import _latest_step, _start_and_kill

    train = {"checkpoint_every": 2, "log_every": 2, "eval_every": 0, "optimizer": {"name": "adamw", "lr": 2.0e-3}}
    stages = [{"type": "meta", "modules": 2, "epochs": 1, **train},
              {"type": "incubate", "modules": 2, "module": 1, "epochs": 3, **train}]  # 3 x 4 steps
    recipe = tiny_recipe(tmp_path / "r.yaml", stages=stages, model={"kwargs": {"drop_path_rate": 0.1}},
                         data={"limit_train": 256, "limit_eval": 64,  # drop_path, mixup: the RNG must come back
                               "augment": {"crop_padding": 2, "hflip": False, "mixup": 0.2, "mix_prob": 0.5}})
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    r = cli("run", str(recipe), "--out", str(clean))
    assert r.returncode == 0, r.stderr[-2000:]
    _start_and_kill(recipe, killed, after_step=0, resume=False, stage="02-incubate")
    assert 0 < _latest_step(killed, "02-incubate") < 12
    r = cli("run", str(recipe), "--out", str(killed), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming at epoch" in r.stdout

    a = load_file(str(clean / "02-incubate" / "module" / WEIGHTS_FILE))
    b = load_file(str(killed / "02-incubate" / "module" / WEIGHTS_FILE))
    assert a.keys() == b.keys() and "head.weight" in a  # module 1 of 2: blocks 2, 3 and the head
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill+resume"
    # and incubation moved the module's weights away from their initialisation
    meta, _ = load_model(clean / "01-meta" / "model")
    init, _ = incubation_model(meta, TARGET, 2, 1, seed=0)
    assert not torch.equal(a["blocks.2.mlp.fc1.weight"], init.state_dict()["blocks.1.mlp.fc1.weight"])


def test_bad_assembling_input_fails_before_work(tmp_path: Path) -> None:
    """Each mistake is one line naming what differs, raised by the preflight (before any stage
    runs, nothing on disk touched); two of them through the CLI (exit code 2)."""
    from effvision.recipe import load_recipe
    from effvision.stages import preflight

    dirs, _ = _modules(tmp_path, meta_seed=0)
    other, _ = _modules(tmp_path, meta_seed=1)
    other_meta = save_model(create_model(meta_spec(TARGET, 4)), meta_spec(TARGET, 4), tmp_path / "meta-k4")
    meta = {"type": "meta", "modules": 2, "epochs": 1}
    inc = {"type": "incubate", "modules": 2, "module": 0, "epochs": 1}
    cases = [
        ([{**meta, "modules": 3}], "modules: 3 does not divide the target's 4 blocks"),
        ([meta, {**inc, "module": 2}], "module: 2 is out of range for 2 modules (0..1)"),
        ([meta, {**inc, "modules": 4}], "modules: 4, but the meta stage before it has modules: 2"),
        ([{**inc, "meta": str(other_meta)}], "holds vit_micro_patch4_32 {'depth': 4}, not the meta model of this recipe's target for modules: 2"),
        ([{"type": "assemble", "modules": [str(dirs[0]), str(other[1])]}], "modules differ in meta_hash"),
        ([{"type": "assemble", "modules": [str(d) for d in dirs + dirs]}], r"once each: duplicated [0, 1]"),
        ([{"type": "assemble", "modules": [str(tmp_path / "nowhere")]}], "modules: no incubated module in"),
        ([meta, inc, {"type": "assemble"}], "assemble needs modules 0..1 once each: missing [1]"),
        ([{"type": "train", "epochs": 1}, {"type": "grow", "depth": 3}], "stages[1].depth: 3 would shrink the model"),
    ]
    for i, (stages, message) in enumerate(cases):
        recipe = load_recipe(tiny_recipe(tmp_path / f"bad{i}.yaml", stages=stages))
        with pytest.raises(EffVisionError) as e:
            preflight(recipe)
        assert message in str(e.value) and "\n" not in str(e.value), (message, str(e.value))
    for i in (4, 7):
        r = cli("run", str(tmp_path / f"bad{i}.yaml"), "--out", str(tmp_path / "run"))
        assert r.returncode == 2 and cases[i][1] in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "run").exists()
