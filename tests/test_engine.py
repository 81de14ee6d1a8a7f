"""The training engine's switches and extension points, in-process on tiny data."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import effvision  # noqa: F401
from effvision.data import AugmentConfig, DataConfig, build_loaders
from effvision.engine import Hooks, OptimizerConfig, SchedulerConfig, TrainConfig, Trainer, register_optimizer
from effvision.engine.optim import OPTIMIZERS

CPU = torch.device("cpu")
NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _digits(limit: int = 256, **aug) -> object:
    cfg = DataConfig(name="digits", batch_size=64, limit_train=limit, limit_eval=64,
                     augment=AugmentConfig(crop_padding=2, hflip=False, **aug))
    return build_loaders(cfg, device=CPU, seed=0, **NORM)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_micro_patch4_32", depth=2)


def _fit(tmp_path: Path, cfg: TrainConfig, loaders=None, model: torch.nn.Module | None = None, **kw):
    trainer = Trainer(model or _model(), cfg, loaders or _digits(), device=CPU, out_dir=tmp_path, num_classes=10,
                      progress=False, **kw)
    return trainer, trainer.fit()


def test_onecycle_warms_up_then_anneals(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=2, optimizer=OptimizerConfig(lr=1e-3), scheduler=SchedulerConfig(name="onecycle", warmup_epochs=1),
                      eval_every=0)
    lrs: list[float] = []
    hooks = Hooks(after_step=[lambda m, step, total: lrs.append(trainer_ref[0].optimizer.param_groups[0]["lr"])])
    trainer_ref: list[Trainer] = []
    trainer = Trainer(_model(), cfg, _digits(), device=CPU, out_dir=tmp_path, num_classes=10, hooks=hooks, progress=False)
    trainer_ref.append(trainer)
    trainer.fit()
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert 2 <= peak <= 5 and lrs[peak] == pytest.approx(1e-3, rel=0.05)  # peak after the 4-step rise
    assert lrs[-1] < 1e-5 and lrs[0] < lrs[peak]


def test_ema_weights_are_kept_and_differ_from_raw(tmp_path: Path) -> None:
    trainer, result = _fit(tmp_path, TrainConfig(epochs=1, ema_decay=0.9, eval_every=0))
    assert result.model is trainer.ema.module
    raw, ema = trainer.model.state_dict(), result.model.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())


def test_grad_checkpointing_matches_plain_training(tmp_path: Path) -> None:
    cfg = dict(epochs=1, eval_every=0, label_smoothing=0.0)
    runs = {}
    for name, on in (("plain", False), ("ckpt", True)):
        # Equal weights would also hold with checkpointing off: count a block's training forwards
        # too. Checkpointing drops the block's activations and reruns it in backward: twice a step.
        model, training = _model(), []
        model.blocks[0].register_forward_pre_hook(lambda m, args: training.append(m.training))
        runs[name] = _fit(tmp_path / name, TrainConfig(grad_checkpointing=on, **cfg), model=model)[1], sum(training)
    (plain, plain_calls), (ckpt, ckpt_calls) = runs["plain"], runs["ckpt"]
    assert (plain_calls, ckpt_calls) == (4, 8)  # 4 steps (256 samples / batch 64)
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(ckpt.model.state_dict()[k], v, atol=1e-5, rtol=1e-5)


def test_loss_terms_and_step_hooks_are_applied(tmp_path: Path) -> None:
    import json

    seen: list[int] = []
    # A term tied to the weights (so it is part of the graph) worth 1000 on top of the ~2.3 task loss.
    term = lambda model, x, y, logits: {"extra": 1000.0 + 0.0 * model.head.weight.sum()}  # noqa: E731
    hooks = Hooks(loss_terms=[term], before_step=[lambda m, step, total: seen.append(step)])
    _fit(tmp_path, TrainConfig(epochs=1, eval_every=0, log_every=1), hooks=hooks)
    assert seen == list(range(4))  # 256 samples / batch 64: once per step, in order
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r["loss"] for r in records if not r.get("eval")]
    assert len(logged) == 4 and all(1000.0 < v < 1010.0 for v in logged)


def test_registered_optimizer_factory_is_used(tmp_path: Path) -> None:
    calls: list[str] = []

    @register_optimizer("test_sgd")
    def _factory(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
        calls.append(cfg.name)
        return torch.optim.SGD(model.parameters(), lr=cfg.lr)

    try:
        trainer, _ = _fit(tmp_path, TrainConfig(epochs=1, eval_every=0, optimizer=OptimizerConfig(name="test_sgd", lr=0.01)))
        assert calls == ["test_sgd"] and isinstance(trainer.optimizer, torch.optim.SGD)
    finally:
        OPTIMIZERS.pop("test_sgd")


def test_mixup_cutmix_through_timm(tmp_path: Path) -> None:
    trainer, result = _fit(tmp_path, TrainConfig(epochs=1, eval_every=0), loaders=_digits(mixup=0.8, cutmix=1.0),
                           augment=AugmentConfig(mixup=0.8, cutmix=1.0))
    assert type(trainer.mixup).__module__.startswith("timm.")
    assert type(trainer.criterion).__name__ == "SoftTargetCrossEntropy"


def test_folder_loader_trains_with_timm_randaugment(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("val", 4)):
        for c in ("cats", "dogs"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                px = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(px).save(root / split / c / f"{i}.png")
    cfg = DataConfig(name="imagefolder", root=str(root), img_size=32, batch_size=8, eval_split="val", num_workers=0,
                     augment=AugmentConfig(auto_augment="rand-m9-mstd0.5", random_erasing=0.25))
    loaders = build_loaders(cfg, device=CPU, seed=0, **NORM)
    assert loaders.info.classes == ["cats", "dogs"] and len(loaders.train) == 3
    x, y = next(loaders.train.epoch(0))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    # Resuming mid-epoch yields the same samples in the same order (labels are deterministic).
    full = [y for _, y in loaders.train.epoch(1)]
    tail = [y for _, y in loaders.train.epoch(1, start_step=1)]
    assert all(torch.equal(a, b) for a, b in zip(full[1:], tail)) and len(tail) == 2
    trainer = Trainer(timm.create_model("vit_micro_patch4_32", num_classes=2), TrainConfig(epochs=1), loaders,
                      device=CPU, out_dir=tmp_path / "run", num_classes=2, progress=False)
    result = trainer.fit()
    assert result.metrics["samples"] == 8 and 0 <= result.metrics["top1"] <= 100


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path: Path) -> None:
    # torch.compile (inductor, C++ on the CPU) must train the same model as eager, up to
    # kernel-fusion rounding over a couple of AdamW steps.
    cfg = dict(epochs=1, eval_every=0, label_smoothing=0.0)
    from torch._dynamo.utils import counters

    _, eager = _fit(tmp_path / "eager", TrainConfig(**cfg), loaders=_digits(limit=128))
    counters.clear()
    trainer, compiled = _fit(tmp_path / "compiled", TrainConfig(compile=True, **cfg), loaders=_digits(limit=128))
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really captured a graph (no silent eager)
    for k, v in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[k], v, atol=1e-4, rtol=1e-4)


def test_resume_from_final_checkpoint_still_reports_accuracy_and_total_time(tmp_path: Path) -> None:
    trainer, first = _fit(tmp_path, TrainConfig(epochs=1, eval_every=0))
    again = Trainer(_model(), TrainConfig(epochs=1, eval_every=0), _digits(), device=CPU, out_dir=tmp_path,
                    num_classes=10, progress=False).fit(resume=True)
    assert again.metrics["top1"] == pytest.approx(first.metrics["top1"])
    assert again.metrics["train_time_s"] == pytest.approx(first.metrics["train_time_s"])


def test_non_finite_weights_are_never_checkpointed(tmp_path: Path) -> None:
    from effvision.engine import TrainPosition
    from effvision.errors import TrainingDiverged

    trainer, _ = _fit(tmp_path, TrainConfig(epochs=1, eval_every=0))
    good = trainer.checkpointer.latest()
    with torch.no_grad():
        trainer.model.head.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="weights are not finite"):
        trainer._save(TrainPosition(1, 0, 99))
    assert trainer.checkpointer.latest() == good and not (tmp_path / "checkpoints" / "step-00000099").exists()


def test_checkpoint_found_without_latest_pointer(tmp_path: Path) -> None:
    trainer, _ = _fit(tmp_path, TrainConfig(epochs=1, eval_every=0))
    newest = trainer.checkpointer.latest()
    (tmp_path / "checkpoints" / "latest").unlink()  # e.g. killed between the rename and the pointer
    assert trainer.checkpointer.latest() == newest


def test_onecycle_keeps_the_recipes_betas(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, eval_every=0, scheduler=SchedulerConfig(name="onecycle", warmup_epochs=0.5),
                      optimizer=OptimizerConfig(lr=1e-3, betas=[0.8, 0.95]))
    trainer, _ = _fit(tmp_path, cfg)
    assert tuple(trainer.optimizer.param_groups[0]["betas"]) == (0.8, 0.95)


def test_stage_dirs_ignore_incomplete_attempts(tmp_path: Path) -> None:
    from effvision.engine.stage import stage_dirs

    for name in ("01-train", "02-export", "02-export.incomplete-1700000000", "notes"):
        (tmp_path / name).mkdir()
    assert [d.name for d in stage_dirs(tmp_path)] == ["02-export", "01-train"]
    assert [d.name for d in stage_dirs(tmp_path, before=2)] == ["01-train"]
