"""Training conventions users expect from timm-style loops: gradient accumulation that keeps the
global batch, and experiment logs (TensorBoard event files, a CSV summary) beside metrics.jsonl."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import effvision  # noqa: F401
from effvision.data import AugmentConfig, DataConfig, build_loaders
from effvision.engine import OptimizerConfig, TrainConfig, Trainer
from effvision.engine.loggers import LogConfig
from effvision.errors import ConfigError

CPU = torch.device("cpu")


def _loaders(limit: int = 128, **aug):
    cfg = DataConfig(name="digits", batch_size=32, limit_train=limit, limit_eval=64,
                     augment=AugmentConfig(crop_padding=2, hflip=False, **aug))
    return build_loaders(cfg, device=CPU, seed=0, mean=(0.5,) * 3, std=(0.5,) * 3)


def _fit(out: Path, cfg: TrainConfig, loaders=None, events: list | None = None):
    """``events``, if given, receives the batch size of every training forward and "step" at every
    optimizer step, in order."""
    torch.manual_seed(0)
    model = timm.create_model("vit_micro_patch4_32", depth=2)
    trainer = Trainer(model, cfg, loaders or _loaders(), device=CPU, out_dir=out, num_classes=10, progress=False)
    if events is not None:
        model.register_forward_pre_hook(lambda m, args: events.append(len(args[0])) if m.training else None)
        trainer.optimizer.register_step_post_hook(lambda opt, args, kwargs: events.append("step"))
    return trainer.fit()


@pytest.mark.parametrize("aug", [{}, {"mixup": 0.8, "cutmix": 1.0}], ids=["plain", "mixup"])
def test_gradient_accumulation_gives_the_same_updates(tmp_path: Path, aug: dict) -> None:
    # 32 images per update either way; with 3 micro-batches (11/11/10) the weighted losses
    # add up to the full batch's, so the weights after 8 updates agree to float rounding.
    # SGD, not Adam: Adam would hide a wrongly scaled gradient.
    base = dict(epochs=2, eval_every=0, optimizer=OptimizerConfig(name="sgd", lr=0.1), log=LogConfig(tensorboard=False))
    seen: dict[str, list] = {"whole": [], "accum": []}
    whole = _fit(tmp_path / "whole", TrainConfig(**base), _loaders(**aug), seen["whole"])
    accum = _fit(tmp_path / "accum", TrainConfig(grad_accum_steps=3, **base), _loaders(**aug), seen["accum"])
    assert whole.metrics["train_img_per_s"] > 0
    # Equal weights alone would also hold with accumulation ignored: the model must really have
    # seen micro-batches of 11/11/10 and the optimizer stepped once per 3 of them (8 updates).
    assert seen["whole"] == [32, "step"] * 8
    assert seen["accum"] == [11, 11, 10, "step"] * 8
    for k, v in whole.model.state_dict().items():
        torch.testing.assert_close(accum.model.state_dict()[k], v, atol=1e-5, rtol=1e-4)
    # The logged loss is the full batch's, not the last micro-batch's.
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("whole", "accum")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_gradient_accumulation_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        TrainConfig(grad_accum_steps=0).validate("stages[0]")
    with pytest.raises(ConfigError, match="layerwise"):
        TrainConfig(grad_accum_steps=2, optimizer=OptimizerConfig(name="galore_adamw", layerwise=True)).validate("s")


def test_tensorboard_and_csv_logs_follow_metrics(tmp_path: Path) -> None:
    _fit(tmp_path, TrainConfig(epochs=2, log_every=2, optimizer=OptimizerConfig(lr=1e-3)))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if not r.get("eval")]
    evals = [r for r in records if r.get("eval")]

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/img_per_s", "eval/top1", "eval/loss"} <= set(events.Tags()["scalars"])
    tb_loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert tb_loss == [(r["global_step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    assert [e.value for e in events.Scalars("eval/top1")] == pytest.approx([r["top1"] for r in evals], rel=1e-6)

    with (tmp_path / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert [float(r["eval_top1"]) for r in rows] == pytest.approx([r["top1"] for r in evals])
    assert all(float(r["train_loss"]) > 0 for r in rows)


def test_logs_can_be_switched_off(tmp_path: Path) -> None:
    _fit(tmp_path, TrainConfig(epochs=1, log=LogConfig(tensorboard=False, csv=False)))
    assert (tmp_path / "metrics.jsonl").is_file()
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "summary.csv").exists()


def test_wandb_without_the_package_is_a_config_error() -> None:
    pytest.importorskip("tensorboard")
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"stages\[0\]\.log\.wandb: the wandb package is not installed"):
        TrainConfig(log=LogConfig(wandb=True)).validate("stages[0]")
