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
from .errors import ConfigError, EffVisionError
from .models.io import SPEC_FILE, WEIGHTS_FILE, ModelSpec, create_model, load_model, save_model, spec_of_model
from .models.modes import RECORD_ATTR, record_of

__all__ = ["prune", "train", "distill", "quantize", "save", "load", "export_model", "spec_of", "PruneSpec", "QuantConfig"]

Batch = tuple[torch.Tensor, torch.Tensor]
Data = Iterable[Batch]                                   # a DataLoader of (images, labels), or a list
Calibration = Data | Iterable[torch.Tensor] | Callable[[nn.Module], Any]


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a model dir (any effvision stage's, or one ``save`` wrote).

    The timm model is created, its record of modes replayed and its weights loaded strictly.
    It carries its spec, so ``save`` needs no arguments (``spec_of(model)`` shows it).

    Args:
        directory: The model dir (``model.json`` and ``model.safetensors``).
        map_location: Where the weights are loaded (``torch.load``'s sense).

    Returns:
        The rebuilt model.

    Raises:
        EffVisionError: If the directory holds no model, names an unknown timm model, or its
            weights are corrupt or do not match the rebuilt model.
    """
    return load_model(directory, map_location)[0]


def prune(model: nn.Module, ratios: dict[str, float] | PruneSpec, example_inputs: torch.Tensor,
          calib: Data | None = None, num_batches: int = 8) -> nn.Module:
    """Prune a model structurally, in place (Torch-Pruning with effvision's timm handlers).

    Tensors really shrink: the result is a plain timm model whose record gains a ``prune``
    entry, so ``save`` and ``load`` rebuild it.

    Args:
        model: The model to prune (a timm model, or one ``load`` returned).
        ratios: The fraction removed per kind, each in [0, 1): ``heads`` (attention heads),
            ``mlp`` (MLP hidden units), ``width`` (ViT embedding width), ``channels`` (every
            other conv/linear group); a dict is ranked by PruneSpec's default criterion (l2).
            Or a full ``PruneSpec`` (criterion, round_to, ignore, steps, per-layer ratios).
        example_inputs: One input batch (B, C, H, W): traced for the dependency graph, and run
            after pruning to check the model keeps its output shape.
        calib: (images, labels) batches (or bare image batches) for the data-driven criteria
            (taylor, obd), which need it.
        num_batches: How many batches of ``calib`` are used.

    Returns:
        The same model, pruned.

    Raises:
        ConfigError: If the criterion is unknown.
        EffVisionError: If a kind or ratio is invalid, a data-driven criterion gets no
            ``calib``, no handler covers the model's family (nothing to prune, or
            Torch-Pruning fails), or the model's earlier modes forbid pruning.
    """
    spec = ratios if isinstance(ratios, PruneSpec) else PruneSpec(ratios=dict(ratios))  # criterion: PruneSpec's default
    batches = _batches(calib, num_batches) if calib is not None else None
    return prune_(model, spec, example_inputs, batches)


def quantize(model: nn.Module, config: QuantConfig | None = None, *, calib: Calibration,
             val: Data | None = None, num_batches: int | None = None) -> QuantReport:
    """Fake-quantize a model in place and calibrate it.

    Every ``nn.Linear`` and ``nn.Conv2d`` not excluded by ``config.exclude`` is quantized; the
    model's record gains a ``quantize`` entry. With ``val`` and ``config.accuracy_budget``,
    the most sensitive layers fall back to float until the top-1 drop fits the budget.

    Args:
        model: The model to quantize.
        config: What to quantize, to which format, for which runtime; default
            ``QuantConfig()`` (int8 for TensorRT).
        calib: The calibration data: a DataLoader or list of (images, labels) batches (or of
            bare image batches), or a forward loop ``calib(model)`` that runs the data through
            the model.
        val: (images, labels) batches, all used, on which top-1 is measured before and after
            (needed for the accuracy-budget fallback).
        num_batches: How many batches of ``calib`` are used (instead of ``config.calib_batches``;
            the given config object is not changed).

    Returns:
        The quantized module names, the calibration sample count and, with ``val``, the
            float and quantized top-1, per-layer sensitivity and the layers returned to float.

    Raises:
        ConfigError: If ``config`` is invalid.
        EffVisionError: If the data gives no batches or fewer than
            ``config.min_calib_samples`` images, nothing is left to quantize, or the model's
            earlier modes forbid quantizing (e.g. it is quantized already).
    """
    cfg = config or QuantConfig()
    if num_batches is not None:  # a copy: the caller's config stays as given
        cfg = dataclasses.replace(cfg, calib_batches=num_batches)
    cfg.validate("quantize config")
    data: list[Batch] | Callable[[nn.Module], Any] = calib if callable(calib) else _batches(calib, cfg.calib_batches)
    return quantize_(model, cfg, data, _batches(val, 10**9) if val is not None else None)


def train(model: nn.Module, data: Data, *, epochs: int = 1, lr: float = field_default(OptimizerConfig, "lr"),
          val: Data | None = None, teacher: nn.Module | None = None, distill: DistillSpec | None = None,
          out_dir: str | Path | None = None, device: str = "cpu", config: TrainConfig | None = None) -> dict[str, Any]:
    """Train a model in place with effvision's trainer.

    AdamW with a cosine schedule by default (``config`` for everything else), evaluated once
    at the end; distilled from a frozen ``teacher`` when given (the finetune stage's loss).
    The model is left in eval mode.

    Args:
        model: The model to train.
        data: The training data: a DataLoader or any re-iterable of (images, labels) batches.
            Its first batch gives the input shape.
        epochs: Training epochs (when ``config`` is not given).
        lr: Peak learning rate of AdamW (when ``config`` is not given).
        val: (images, labels) batches the final metrics are computed on; default: the
            training data.
        teacher: A teacher model, frozen, that the model is distilled from; it sees the same
            inputs as the model.
        distill: How to distill from ``teacher`` (default ``DistillSpec()``: soft logits);
            unused without a teacher.
        out_dir: Where checkpoints and (without ``config``) the TensorBoard/CSV logs are kept,
            held for one writer; default: a temporary directory, removed afterwards.
        device: The device to train on (``"cpu"``, ``"cuda"``, ...).
        config: The full training config; when given, ``epochs``, ``lr`` and the logging
            defaults are not used.

    Returns:
        The final metrics (top1, top5, loss, ...) and ``evaluated_on``: ``"val"`` or
            ``"train"``.

    Raises:
        ConfigError: If the training config or the distillation spec is invalid.
        EffVisionError: If ``out_dir`` is in use by another effvision process, or the loss
            diverges (``TrainingDiverged``).
    """
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
    """Train a student from a frozen teacher: ``train`` with a distillation loss.

    Logit distillation, optionally with feature distillation through a learned projection.

    Args:
        student: The model to train, in place.
        teacher: The teacher model; it sees the same inputs as the student.
        data: The training data, as for ``train``.
        kind: ``"soft"`` (KL divergence of temperature-scaled logits), ``"hard"`` (cross-entropy
            on the teacher's top class) or ``"token"`` (hard, on the student's distillation
            head ``head_dist`` where it has one, as DeiT).
        alpha: Weight of the distillation term (the label loss keeps weight 1).
        temperature: The softmax temperature (soft only).
        feature_weight: Weight of the feature term (mean squared error between the projected
            student and teacher pre-logit features); 0 leaves it out.
        **train_args: Passed on to ``train`` (epochs, lr, val, out_dir, device, config).

    Returns:
        The final metrics, as ``train`` returns them.

    Raises:
        ConfigError: If ``alpha`` or ``feature_weight`` is negative, ``temperature`` is not
            positive, or the training config is invalid.
    """
    spec = DistillSpec(kind=kind, alpha=alpha, temperature=temperature, feature_weight=feature_weight)  # type: ignore[arg-type]
    return train(student, data, teacher=teacher, distill=spec, **train_args)


def spec_of(model: nn.Module, *, img_size: int | None = None, mean: tuple[float, ...] | None = None,
            std: tuple[float, ...] | None = None, class_names: list[str] | None = None,
            kwargs: dict[str, Any] | None = None) -> ModelSpec:
    """The ModelSpec of a model: what ``save`` writes and ``load`` rebuilds it from.

    For a model built by effvision (``load``, any stage), the spec it was built from with its
    current record; for a timm model, its architecture name and pretrained_cfg (input size,
    mean/std) with the record effvision's verbs left. A timm model whose sizes were changed by
    other code (they differ from ``timm.create_model(name, **kwargs)``) is recorded as pruned.

    Args:
        model: The model.
        img_size: The input size, overriding the spec's (timm: pretrained_cfg's input size).
        mean: The normalization mean, overriding the spec's (timm: pretrained_cfg's).
        std: The normalization std, overriding the spec's (timm: pretrained_cfg's).
        class_names: The class names, overriding the spec's.
        kwargs: The ``timm.create_model`` keyword arguments the model was built with
            (e.g. ``depth``), overriding the spec's.

    Returns:
        The model's spec.

    Raises:
        EffVisionError: If the model is not a timm model, or its layers cannot be rebuilt from
            its name, ``kwargs`` and record.
    """
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
    """Save a model as a model dir, the layout ``effvision run`` writes.

    The dir holds the spec with the model's record (``model.json``), the weights
    (``model.safetensors``) and timm's ``config.json``; ``load``, ``export_model`` and
    ``effvision export`` read it. Works on any model ``load`` returned, and on a timm model
    changed by effvision's verbs.

    Args:
        model: The model to save.
        directory: The model dir, made if missing; it must not hold a model already.
        spec: The spec to write (with the model's record); default: ``spec_of(model, **spec_args)``.
        **spec_args: Passed on to ``spec_of`` (img_size, mean, std, class_names, kwargs) when
            ``spec`` is not given.

    Returns:
        The model dir.

    Raises:
        EffVisionError: If ``directory`` holds a model already (nothing is overwritten), or
            ``spec_of`` fails.
    """
    directory = Path(directory)
    if (directory / WEIGHTS_FILE).exists():
        raise EffVisionError(f"{directory} holds a model already; choose another directory (nothing was overwritten)")
    return save_model(model, spec or spec_of(model, **spec_args), directory)


def export_model(model_dir: str | Path, out_dir: str | Path, *, format: str = "onnx", **onnx: Any) -> dict[str, Any]:
    """Export a saved model dir to ONNX (or OpenVINO), as ``effvision export`` does.

    The export is parity-checked against PyTorch and written with a manifest; a quantized
    model dir exports as QDQ for its target.

    Args:
        model_dir: The model dir (``save`` or any effvision stage wrote it).
        out_dir: Where ``model.onnx`` and ``manifest.json`` go, held for one writer; it must
            not hold an export already.
        format: ``"onnx"``, or ``"openvino"`` (also the OpenVINO IR, from standard ONNX).
        **onnx: Fields of ``OnnxExportConfig`` (opset, dynamic_batch, parity_batch_sizes,
            atol, dynamic_hw, hw_multiple).

    Returns:
        A summary of the export: the ONNX file's path, the model and the parity check.

    Raises:
        ConfigError: If an ``onnx`` key is unknown or of the wrong type, the opset is out of
            range, or ``dynamic_hw`` is asked of a quantized model.
        EffVisionError: If ``model_dir`` holds no model, the format is unknown, ``out_dir``
            holds an export already or is in use, or the parity check fails.
    """
    from effvision.export.model_dir import export_model_dir
    from effvision.export.onnx import MAX_OPSET, MIN_OPSET, OnnxExportConfig

    from .config import parse
    from .models.io import read_spec

    if not (Path(model_dir) / SPEC_FILE).is_file() or not (Path(model_dir) / WEIGHTS_FILE).is_file():
        raise EffVisionError(f"no model in {model_dir}: save it first with effvision.save(model, DIR)")
    cfg = parse(OnnxExportConfig, onnx, "export_model")  # unknown keys and wrong types: one ConfigError
    if not MIN_OPSET <= cfg.opset <= MAX_OPSET:
        raise ConfigError(f"export_model.opset: {cfg.opset} is outside {MIN_OPSET}..{MAX_OPSET}")
    if cfg.dynamic_hw and any(m["mode"] == "quantize" for m in read_spec(model_dir).modes):
        raise ConfigError("export_model.dynamic_hw: a quantized model exports at its input size")
    with DirLock(out_dir):
        return export_model_dir(model_dir, out_dir, cfg, format)


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
