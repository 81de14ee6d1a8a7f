"""Curriculum learning (effvision.curriculum): pacing, progressive resizing on ViTs and CNNs,
loss-scored sampling from both loaders, resume-exact batches, the budget clock, bad input."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import effvision.models  # noqa: F401  (registers vit_*_patch4_32)
from conftest import cli, tiny_recipe
from test_resume import _start_and_kill
from effvision.data import AugmentConfig, DataConfig, build_loaders
from effvision.curriculum import BatchRampConfig, CurriculumConfig, apply_curriculum, pacing, resolutions
from effvision.engine import Hooks, SchedulerConfig, TrainConfig, Trainer
from effvision.errors import ConfigError
from effvision.models.io import ModelSpec, save_model
from effvision.recipe import parse_recipe
from effvision.stages import preflight
from effvision.tokens import TokenDropConfig, apply_token_drop

CPU = torch.device("cpu")
DATA = dict(name="digits", batch_size=64, limit_train=256, limit_eval=64,
            augment={"crop_padding": 2, "hflip": False})


def _loaders(**kw: object):
    cfg = DataConfig(**{**DATA, "augment": AugmentConfig(crop_padding=2, hflip=False), **kw})
    return build_loaders(cfg, device=CPU, seed=0, mean=(0.5,) * 3, std=(0.5,) * 3)


def _spec(name: str = "vit_micro_patch4_32") -> ModelSpec:
    return ModelSpec(name=name, num_classes=10, img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)


def _reference(tmp_path: Path) -> Path:
    """A real model dir to score difficulty with (an initialised, untrained micro ViT)."""
    torch.manual_seed(1)
    spec = _spec()
    spec.kwargs = {"depth": 2}
    save_model(timm.create_model(spec.name, num_classes=10, depth=2), spec, tmp_path / "ref")
    return tmp_path / "ref"


def test_pacing_linear_root_discrete() -> None:
    for kind in ("linear", "root", "discrete"):
        cfg = CurriculumConfig(pacing=kind, start=0.25, steps=100, levels=4)
        d = [pacing(cfg, t, 1000) for t in range(0, 151)]
        assert d[0] == 0.25 and d[100] == 1.0 and d[150] == 1.0 and d == sorted(d)
    root, lin = CurriculumConfig(pacing="root", start=0.25, steps=100), CurriculumConfig(start=0.25, steps=100)
    assert pacing(root, 25, 0) > pacing(lin, 25, 0)  # root paces faster early
    disc = CurriculumConfig(pacing="discrete", start=0.25, steps=90, levels=4)
    assert sorted({pacing(disc, t, 0) for t in range(200)}) == [0.25, 0.5, 0.75, 1.0]
    assert pacing(CurriculumConfig(start=0.5), 50, 200) == 0.75  # steps 0: the first half of the run
    # Sizes: multiples of the patch size, at most `levels` of them with discrete pacing.
    assert resolutions(CurriculumConfig(start=0.5), 32, 4) == [16, 20, 24, 28, 32]
    assert resolutions(CurriculumConfig(start=0.5, pacing="discrete", levels=3), 32, 4) == [16, 24, 32]


def test_resolution_curriculum_trains_vit_and_serves_cnn(tmp_path: Path) -> None:
    """The ViT trains on 16 -> 32 px batches (timm's dynamic size); at 32 px it is the same model."""
    loaders = _loaders()
    torch.manual_seed(0)
    model = timm.create_model("vit_micro_patch4_32", depth=2)
    before = copy.deepcopy(model).eval()
    hooks = Hooks()
    cur = CurriculumConfig(metric="resolution", start=0.5, pacing="discrete", levels=3, steps=4)
    loaders = apply_curriculum(model, loaders, cur, hooks, spec=_spec(), epochs=2, seed=0, device=CPU,
                               run_dir=tmp_path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), before(x))  # dynamic size is exact at the trained size
    sizes: list[int] = []
    hooks.loss_terms.append(lambda m, xb, y, logits: sizes.append(xb.shape[-1]) or {})
    trainer = Trainer(model, TrainConfig(epochs=2, eval_every=0), loaders, device=CPU, out_dir=tmp_path / "t",
                      num_classes=10, progress=False, hooks=hooks)
    trainer.fit()
    assert sizes == [16, 16, 24, 24, 32, 32, 32, 32]
    # convvit (timm HybridEmbed: its patch is 4 px on the image) and a CNN take the small sizes too.
    for name in ("convvit_tiny_32", "resnet10t"):
        m = timm.create_model(name, num_classes=10)
        small = apply_curriculum(m, _loaders(), cur, Hooks(), spec=_spec(name), epochs=2, seed=0, device=CPU,
                                 run_dir=tmp_path)
        xb, _ = next(small.train.epoch(0))
        assert xb.shape[-1] == 16 and m(xb).shape == (64, 10)


def _imagefolder(root: Path) -> Path:
    """digits as PNG files in an ImageFolder tree (the folder loader's input)."""
    from effvision.data import digits

    for split, arr in digits(32).items():
        for i in range(0, 120):
            d = root / split / arr.classes[int(arr.labels[i])]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr.images[i].permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    return root


def test_loss_curriculum_easiest_first_from_both_loaders(tmp_path: Path) -> None:
    ref = _reference(tmp_path)
    cur = CurriculumConfig(metric="loss", reference=str(ref), start=0.3, steps=8)
    folder = _imagefolder(tmp_path / "folder")
    for data in (dict(), dict(name="imagefolder", root=str(folder), loader="folder", num_workers=0,
                              eval_split="test", batch_size=32)):
        base = _loaders(**data)
        loaders = apply_curriculum(timm.create_model("vit_micro_patch4_32", depth=2), base, cur, Hooks(),
                                   spec=_spec(), epochs=2, seed=0, device=CPU, run_dir=tmp_path / "cache")
        train = loaders.train
        order, n, b = train.order, len(train.order), train.batch_size
        labels = train.inner.labels_in_order()
        rank = torch.empty(n, dtype=torch.long)
        rank[order] = torch.arange(n)  # 0 = easiest
        batches = list(train.epoch(0)) + list(train.epoch(1))
        for step, (_, y) in enumerate(batches):
            idx = train._batch_indices(step // len(train), step % len(train))
            assert torch.equal(y.cpu(), labels[idx])  # the loader served exactly the sampled samples
            pool = min(n, max(b, -(-int(pacing(cur, step, 0) * n * 1000) // 1000)))
            assert int(rank[idx].max()) < pool + 1 and len(set(idx.tolist())) == b
        first = train._batch_indices(0, 0)
        assert int(rank[first].max()) < max(b, int(0.3 * n) + 1)  # step 0: only the easiest 30%
        # A resumed epoch (start_step 2) serves the batches an uninterrupted one does.
        again = list(train.epoch(1, 2))
        assert all(torch.equal(a[1], c[1]) for a, c in zip(again, batches[len(train) + 2:]))
    # Cached in the run dir, one file per training set.
    assert len(list((tmp_path / "cache" / "curriculum").glob("loss-*.safetensors"))) == 2
    # A reference trained on other classes is refused, naming the key.
    spec = ModelSpec(name="vit_micro_patch4_32", num_classes=5, img_size=32, kwargs={"depth": 2})
    save_model(timm.create_model(spec.name, num_classes=5, depth=2), spec, tmp_path / "ref5")
    with pytest.raises(ConfigError, match=r"curriculum.reference .* predicts 5 classes"):
        apply_curriculum(timm.create_model("vit_micro_patch4_32", depth=2), _loaders(),
                         CurriculumConfig(metric="loss", reference=str(tmp_path / "ref5")), Hooks(), spec=_spec(),
                         epochs=1, seed=0, device=CPU, run_dir=tmp_path / "cache")


def test_budget_clock_paces_tokens_curriculum_and_batch_ramp(tmp_path: Path) -> None:
    """Under budget_s the kept tokens, the resolution and the batch follow the spent budget (injected clock)."""
    from test_token_drop import _FakeClock

    model = timm.create_model("vit_micro_patch4_32", depth=3)
    hooks = Hooks()
    apply_token_drop(model, TokenDropConfig(start_tokens=16, buckets=4), hooks, seed=0)
    loaders = apply_curriculum(model, _loaders(), CurriculumConfig(start=0.5), hooks, spec=_spec(), epochs=100,
                               seed=0, device=CPU, run_dir=tmp_path, batch_ramp=BatchRampConfig(start=0.25))
    seen: list[tuple[int, int, int]] = []
    hooks.loss_terms.append(lambda m, x, y, logits: seen.append((x.shape[-1], m.blocks[1]._ltd.keep, len(y))) or {})
    cfg = TrainConfig(epochs=100, budget_s=3.0, eval_every=0, scheduler=SchedulerConfig(name="onecycle"))
    trainer = Trainer(model, cfg, loaders, device=CPU, out_dir=tmp_path / "t", num_classes=10, progress=False,
                      hooks=hooks, timer=_FakeClock())
    trainer.fit()
    # 0.5 s a step, 6 steps at positions 0, 67, 133, 200, ... of 400; every schedule is full at half the
    # budget (its default horizon), though `epochs` (400 steps) is only an upper bound.
    assert [s for s, _, _ in seen] == [16, 20, 24, 32, 32, 32]
    assert [k for _, k, _ in seen] == [16, 16, 32, 64, 64, 64]  # MSLG levels (counted on the 32 px grid)
    assert [b for _, _, b in seen] == [16, 16, 32, 64, 64, 64]  # the batch ramp, 16 -> 64
    assert trainer.images_seen == 16 + 16 + 32 + 64 + 64 + 64  # throughput counts the ramped batches


def _recipe(**train: object) -> dict:
    return {"name": "t", "device": "cpu", "model": {"name": "vit_micro_patch4_32"}, "data": dict(DATA),
            "stages": [{"type": "train", "epochs": 1, **train}]}


def test_bad_input_is_one_line_before_training(tmp_path: Path) -> None:
    cases = [
        ({"token_drop": {"layers": [9]}}, "stages[0].token_drop.layers: block index 9"),
        ({"token_drop": {"start_tokens": 65}}, "stages[0].token_drop.start_tokens 65 is larger"),
        ({"token_drop": {"start_tokens": 0}}, "stages[0].token_drop.start_tokens must be at least 1"),
        ({"curriculum": {"metric": "loss", "reference": str(tmp_path / "nope")}}, "stages[0].curriculum.reference"),
        ({"curriculum": {"metric": "loss"}}, "stages[0].curriculum.reference"),
        ({"curriculum": {"metric": "loss", "reference": "01-train"}},
         "stages[0].curriculum.reference '01-train' is not an earlier stage"),
        ({"curriculum": {"size_step": 6}}, "stages[0].curriculum.size_step 6"),
        ({"budget_s": 0}, "stages[0].budget_s must be positive"),
        ({"budget_s": -5}, "stages[0].budget_s must be positive"),
        ({"batch_ramp": {"start": 0}}, "stages[0].batch_ramp.start"),
    ]
    for train, message in cases:
        with pytest.raises(ConfigError, match=r"^" + message.replace("[", r"\[").replace("]", r"\]")):
            preflight(parse_recipe(_recipe(**train)))
    cnn = _recipe(token_drop={})
    cnn["model"] = {"name": "resnet10t"}
    with pytest.raises(ConfigError, match=r"stages\[0\].token_drop: ResNet has no transformer blocks"):
        preflight(parse_recipe(cnn))
    # After a stage that changes the architecture (growth to 6 blocks), block 5 exists: the check
    # waits for the stage's own start.
    grown = _recipe(token_drop={"layers": [5]})
    grown["stages"][:0] = [{"type": "train", "epochs": 1}, {"type": "grow", "depth": 6}]
    preflight(parse_recipe(grown))
    # From the CLI: exit code 2, one line naming the key, nothing written.
    path = tiny_recipe(tmp_path / "r.yaml", train={"token_drop": {"layers": [9]}})
    r = cli("run", str(path), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "token_drop.layers" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_loss_curriculum_recipe_is_resume_exact(tmp_path: Path) -> None:
    """SIGKILL + --resume under a loss curriculum ends bit-identical; scores are computed once."""
    ref = _reference(tmp_path)
    train = {"epochs": 2, "checkpoint_every": 3, "log_every": 2, "eval_every": 0,
             "curriculum": {"metric": "loss", "reference": str(ref), "start": 0.3, "pacing": "root"}}
    recipe = tiny_recipe(tmp_path / "r.yaml", train=train, model={"name": "vit_micro_patch4_32",
                                                                   "kwargs": {"depth": 2}}, data=DATA)
    clean = tmp_path / "clean"
    r = cli("run", str(recipe), "--out", str(clean))
    assert r.returncode == 0, r.stderr
    assert "curriculum: scored 256 training samples" in r.stdout
    killed = tmp_path / "killed"
    _start_and_kill(recipe, killed, after_step=0, resume=False)
    r = cli("run", str(recipe), "--out", str(killed), "--resume")
    assert r.returncode == 0, r.stderr
    assert "scored" not in r.stdout  # the cached scores in the run dir were reused
    a = load_file(str(clean / "01-train" / "model" / "model.safetensors"))
    b = load_file(str(killed / "01-train" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(*(load_file(str(next((d / "curriculum").glob("loss-*"))))["loss"] for d in (clean, killed)))
