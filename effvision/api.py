"""effvision without a recipe: prune, distill, quantize, save and export a model in a few lines
(for notebooks; torchao's config + verb and ModelOpt's forward loop are the models).

    import effvision as ev
    ev.prune(model, {"mlp": 0.5, "heads": 0.25}, example_inputs=x)
    ev.train(model, train_loader, epochs=2, val=val_loader)           # recover, or:
    ev.distill(model, teacher, train_loader, epochs=2, val=val_loader)
    ev.quantize(model, ev.QuantConfig(target="ort-cpu"), calib=train_loader)
    ev.save(model, "out/model", img_size=32)
    model = ev.load("out/model")                                        # the same model, rebuilt
    ev.export_model("out/model", "out/onnx")

Data comes as a torch DataLoader (or any re-iterable of (x, y) batches); calibration may also
be a forward loop ``calib(model)``. Each verb is the one the recipe stages call, so a model made
here saves, reloads and exports exactly like one made by ``effvision run``. Every verb that
changes the model adds a mode to the record it carries (``effvision.models.modes``), which
``save`` writes and ``load`` replays, so ``load`` -> ``save`` -> ``load`` gives the same model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .compress.distill import DistillLoss, DistillSpec, Distilled
from .compress.prune import PruneSpec, prune_
from .compress.quantize import QuantConfig, QuantReport, quantize_
from .config import field_default
from .data.build import DataInfo, Loaders
from .dirlock import DirLock
from .engine import TrainConfig
from .engine.extensions import TrainSetup
from .engine.fit import fit
from .engine.loggers import LogConfig
from .engine.optim import OptimizerConfig
from .errors import EffVisionError
from .models.io import SPEC_FILE, WEIGHTS_FILE, ModelSpec, create_model, load_model, save_model, spec_of_model
from .models.modes import RECORD_ATTR, record_of

__all__ = ["prune", "train", "distill", "quantize", "save", "load", "export_model", "spec_of", "PruneSpec", "QuantConfig"]

Batch = tuple[torch.Tensor, torch.Tensor]
Data = Iterable[Batch]                                   # a DataLoader of (images, labels), or a list
Calibration = Data | Iterable[torch.Tensor] | Callable[[nn.Module], Any]


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The model of a model dir (any effvision stage's, or one ``save`` wrote), rebuilt: the timm
    model, its record of modes replayed, its weights loaded. It carries its spec, so ``save``
    needs no arguments (``spec_of(model)`` shows it)."""
    return load_model(directory, map_location)[0]


def prune(model: nn.Module, ratios: dict[str, float] | PruneSpec, example_inputs: torch.Tensor,
          calib: Data | None = None, num_batches: int = 8) -> nn.Module:
    """Structured pruning in place (Torch-Pruning with effvision's timm handlers). ``ratios``:
    fraction removed per kind (``mlp``, ``heads``, ``embed``, ``channels``...); ``calib`` feeds
    data-driven criteria (taylor, obd)."""
    spec = ratios if isinstance(ratios, PruneSpec) else PruneSpec(ratios=dict(ratios))  # criterion: PruneSpec's default
    batches = _batches(calib, num_batches) if calib is not None else None
    return prune_(model, spec, example_inputs, batches)


def quantize(model: nn.Module, config: QuantConfig | None = None, *, calib: Calibration,
             val: Data | None = None, num_batches: int | None = None) -> QuantReport:
    """Fake-quantize in place and calibrate: ``calib`` is a DataLoader, a list of batches, or a
    forward loop ``calib(model)``; with ``val`` and ``config.accuracy_budget`` the most sensitive
    layers fall back to float until the top-1 drop fits."""
    cfg = config or QuantConfig()
    cfg.validate("quantize config")
    if num_batches is not None:
        cfg.calib_batches = num_batches
    data: list[Batch] | Callable[[nn.Module], Any] = calib if callable(calib) else _batches(calib, cfg.calib_batches)
    return quantize_(model, cfg, data, _batches(val, 10**9) if val is not None else None)


def train(model: nn.Module, data: Data, *, epochs: int = 1, lr: float = field_default(OptimizerConfig, "lr"),
          val: Data | None = None, teacher: nn.Module | None = None, distill: DistillSpec | None = None,
          out_dir: str | Path | None = None, device: str = "cpu", config: TrainConfig | None = None) -> dict[str, Any]:
    """Train ``model`` in place with effvision's trainer (AdamW + cosine by default; ``config``
    for everything else), distilled from a frozen ``teacher`` when given (the finetune stage's
    loss). Returns the final metrics, on ``val`` (else on the training data, which the metrics
    then say). ``out_dir`` keeps checkpoints and the TensorBoard/CSV logs."""
    cfg = config or TrainConfig(epochs=epochs, optimizer=OptimizerConfig(lr=lr), eval_every=0,
                                log=LogConfig(tensorboard=out_dir is not None, csv=out_dir is not None))
    cfg.validate("train config")
    dev = torch.device(device)
    x0, _ = next(iter(data))
    shape = tuple(x0.shape[1:])  # (C, H, W)

    def with_teacher(ts: TrainSetup) -> None:  # the distill extension's loss, for a teacher given as a module
        spec = distill or DistillSpec()
        spec.validate("distill")
        teacher.to(dev)
        ts.train_model = Distilled(model, teacher, spec, shape, shape)
        ts.hooks.loss_terms.append(DistillLoss(teacher, ts.train_model, spec))
        ts.unwrap = lambda m: m.student if isinstance(m, Distilled) else m

    with torch.no_grad():
        num_classes = int(getattr(model, "num_classes", 0)) or int(model.eval()(x0[:1]).shape[-1])
    train_view = _LoaderView(data, dev)
    loaders = Loaders(train=train_view, eval=_LoaderView(val, dev) if val is not None else train_view,
                      info=DataInfo(classes=[str(i) for i in range(num_classes)], mean=(), std=(), img_size=shape[-1]))
    writer = DirLock(out_dir) if out_dir is not None else contextlib.nullcontext()  # one writer, as for a run
    with tempfile.TemporaryDirectory() as tmp, writer:
        metrics = fit(model, cfg, loaders, device=dev, out_dir=Path(out_dir or tmp), num_classes=num_classes,
                      wrap=with_teacher if teacher is not None else None).metrics
    model.eval()
    return {**metrics, "evaluated_on": "val" if val is not None else "train"}


def distill(student: nn.Module, teacher: nn.Module, data: Data, *, kind: str = "soft", alpha: float = 0.5,
            temperature: float = 2.0, feature_weight: float = 0.0, **train_args: Any) -> dict[str, Any]:
    """``train`` with a teacher: logit distillation (``kind`` soft/hard/token), optionally
    feature distillation through a learned projection (``feature_weight`` > 0)."""
    spec = DistillSpec(kind=kind, alpha=alpha, temperature=temperature, feature_weight=feature_weight)  # type: ignore[arg-type]
    return train(student, data, teacher=teacher, distill=spec, **train_args)


def spec_of(model: nn.Module, *, img_size: int | None = None, mean: tuple[float, ...] | None = None,
            std: tuple[float, ...] | None = None, class_names: list[str] | None = None,
            kwargs: dict[str, Any] | None = None) -> ModelSpec:
    """The ModelSpec of a model: the one it was built from (``load``, any effvision stage) with its
    current record, or for a timm model its architecture name and pretrained_cfg (input size,
    mean/std) with the record its verbs left. A timm model changed by other code than effvision's
    verbs (its sizes differ from ``timm.create_model(name, **kwargs)``) is recorded as pruned."""
    built = spec_of_model(model)
    if built is not None:
        given = {"img_size": img_size, "mean": mean and tuple(mean), "std": std and tuple(std),
                 "class_names": class_names and list(class_names), "kwargs": kwargs and dict(kwargs)}
        return dataclasses.replace(built, **{k: v for k, v in given.items() if v is not None})
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    name = cfg.get("architecture")
    if not name:
        raise EffVisionError("spec_of: not a timm model (no pretrained_cfg['architecture']); pass spec= to save()")
    in_chans, h, _ = cfg.get("input_size", (3, 224, 224))
    spec = ModelSpec(name=name, kwargs=dict(kwargs or {}), num_classes=int(getattr(model, "num_classes", 0)),
                     img_size=img_size or int(h), in_chans=int(in_chans),
                     mean=tuple(mean or cfg.get("mean", (0.5, 0.5, 0.5))), std=tuple(std or cfg.get("std", (0.5, 0.5, 0.5))),
                     class_names=list(class_names or []), modes=record_of(model))
    with torch.device("meta"):  # the architecture the spec rebuilds, without memory
        rebuilt = create_model(spec)
    if _shapes(rebuilt) == _shapes(model):
        return spec
    if hasattr(model, RECORD_ATTR) or set(_shapes(rebuilt)) != set(_shapes(model)):
        raise EffVisionError(f"spec_of: the model's layers differ from timm.create_model('{name}') with its record "
                             f"{[m['mode'] for m in spec.modes]}; pass the constructor's kwargs= (e.g. depth=...) "
                             f"or spec= to save()")
    from .compress.arch import describe_pruned  # sizes changed outside effvision: recorded as pruning

    try:
        diff = describe_pruned(model, rebuilt)
    except TypeError as e:
        raise EffVisionError(f"spec_of: {e}; pass the constructor's kwargs= or spec= to save()") from e
    spec.modes = [{"mode": "prune", "version": 1, "config": {"source": "spec_of"}, "metadata": diff}]
    return spec


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def save(model: nn.Module, directory: str | Path, *, spec: ModelSpec | None = None, **spec_args: Any) -> Path:
    """A model dir (spec with the model's record + safetensors + timm's config.json), the same
    layout ``effvision run`` writes: ``ev.load``, ``ev.export_model`` and ``effvision export`` read
    it. Works on any model ``load`` returned, and on a timm model changed by effvision's verbs."""
    directory = Path(directory)
    if (directory / WEIGHTS_FILE).exists():
        raise EffVisionError(f"{directory} holds a model already; choose another directory (nothing was overwritten)")
    return save_model(model, spec or spec_of(model, **spec_args), directory)


def export_model(model_dir: str | Path, out_dir: str | Path, *, format: str = "onnx", **onnx: Any) -> dict[str, Any]:
    """A saved model dir -> ONNX (or OpenVINO) with the parity check and manifest of
    ``effvision export``; a quantized dir exports as QDQ for its target. ``onnx``: fields of
    ``OnnxExportConfig`` (opset, dynamic_batch, dynamic_hw, atol, ...)."""
    from effvision.export.model_dir import export_model_dir
    from effvision.export.onnx import OnnxExportConfig

    if not (Path(model_dir) / SPEC_FILE).is_file() or not (Path(model_dir) / WEIGHTS_FILE).is_file():
        raise EffVisionError(f"no model in {model_dir}: save it first with effvision.save(model, DIR)")
    with DirLock(out_dir):
        return export_model_dir(model_dir, out_dir, OnnxExportConfig(**onnx), format)


def _batches(data: Iterable[Any], limit: int) -> list[Batch]:
    """The first ``limit`` batches as (x, y); bare image tensors get dummy labels (calibration)."""
    out = []
    for item in itertools.islice(data, limit):
        if isinstance(item, torch.Tensor):
            item = (item, torch.zeros(len(item), dtype=torch.long))
        x, y = item[0], item[1]
        out.append((x, y))
    if not out:
        raise EffVisionError("the data gave no batches")
    return out


class _LoaderView:
    """A DataLoader seen as an effvision loader (``epoch(e, start_step)``, ``len``, ``batch_size``).
    The order is the DataLoader's own: a resumed run is exact only if its sampler is seeded."""

    def __init__(self, data: Data, device: torch.device) -> None:
        self.data, self.device = data, device
        self.batch_size = getattr(data, "batch_size", None) or len(next(iter(data))[0])

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        for x, y in itertools.islice(self.data, start_step, None):
            yield x.to(self.device), y.to(self.device)
