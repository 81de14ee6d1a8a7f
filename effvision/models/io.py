"""Models move between stages and processes as an architecture spec (JSON: the timm name, its
kwargs and the record of modes applied) plus safetensors weights, never as pickles, so any
stage's model rebuilds in a fresh process."""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import parse
from ..errors import ConfigError, EffVisionError
from ..io import atomic_write_text, read_json_object
from .modes import RECORD_ATTR, migrate_legacy, record_of, restore_modes

__all__ = ["ModelSpec", "create_model", "save_model", "load_model", "read_spec", "timm_config", "spec_of_model",
           "SPEC_FILE", "WEIGHTS_FILE", "TIMM_CONFIG_FILE", "LEGACY_QUANT_FILE"]

SPEC_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"  # also the name timm's hub layout uses
TIMM_CONFIG_FILE = "config.json"    # timm's hub layout: timm.create_model("local-dir:DIR", pretrained=True)
LEGACY_QUANT_FILE = "quant.json"    # model dirs before the mode record kept quantization here
SPEC_FORMAT = 2                     # 2: the mode record; model.json without "modes" is format 1
MAX_SIZE = 2**31 - 1                # classes, pixels, channels: a larger count is a corrupt value (2**70), not a model


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model and feed it: the timm name and its kwargs, the
    preprocessing and class names that export manifests and evaluation need, and the ordered
    record of modes applied to it (``effvision.models.modes``: prune, quantize, reduce_tokens...)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 10
    img_size: int = 32
    in_chans: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    class_names: list[str] = field(default_factory=list)
    # What was done to the timm model, oldest first: [{"mode", "version", "config", "metadata"}, ...]
    modes: list[dict[str, Any]] = field(default_factory=list)

    def validate(self, where: str) -> None:
        """Sizes a model can have (``config.parse`` calls this after the type checks)."""
        for key, low in (("num_classes", 0), ("img_size", 1), ("in_chans", 1)):  # num_classes 0: no head
            if not low <= getattr(self, key) <= MAX_SIZE:
                raise ConfigError(f"{key}: {getattr(self, key)} is out of range ({low} to 2**31 - 1)")

    def to_json(self) -> str:
        return json.dumps({"format": SPEC_FORMAT, **dataclasses.asdict(self)}, indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], quant: dict[str, Any] | None = None, where: str = "model spec"
                  ) -> "ModelSpec":
        """A spec from its JSON data; a spec written before the mode record (``pruned``,
        ``transforms``, and ``quant`` read from its dir's quant.json) is migrated to one."""
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise EffVisionError(f"{where}: not a model spec (a JSON object with a 'name')")
        fmt = data.get("format", 1)
        if type(fmt) is not int or fmt < 1:
            raise EffVisionError(f"{where}: format {fmt!r} is not a model spec format (1 to {SPEC_FORMAT})")
        if fmt > SPEC_FORMAT:
            raise EffVisionError(f"{where}: format {fmt} is newer than this effvision reads ({SPEC_FORMAT}); "
                                 f"upgrade effvision")
        known = {f.name for f in dataclasses.fields(cls)}
        try:  # a recipe's typed check: each field of its annotated type, sizes in range
            spec = parse(cls, {k: v for k, v in data.items() if k in known})
        except ConfigError as e:
            raise EffVisionError(f"{where}: {e}") from e
        if "modes" not in data:  # before the record: today's reader migrates it
            spec.modes = migrate_legacy(data.get("pruned"), data.get("transforms"), quant, where)
        return spec

    @classmethod
    def from_json(cls, text: str, quant: dict[str, Any] | None = None, where: str = "model spec") -> "ModelSpec":
        return cls.from_dict(json.loads(text), quant, where)


def create_model(spec: ModelSpec, pretrained: bool = False, where: str = "model spec") -> nn.Module:
    """``timm.create_model`` with a clear error for unknown names, then the spec's modes replayed
    (pruned shapes, token reduction, fake-quant layers, ...), so the weights of a model saved with
    this spec load strictly. The model carries its record (``modes.record_of``). ``where`` names the
    spec in errors (its model.json)."""
    import effvision.models.small_vit  # noqa: F401  (registration)

    if not timm.is_model(spec.name):
        close = similar_model_names(spec.name)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise EffVisionError(f"unknown model '{spec.name}'{hint} (see `effvision models`)")
    try:
        model = timm.create_model(spec.name, pretrained=pretrained and not spec.modes,
                                  num_classes=spec.num_classes, in_chans=spec.in_chans, **spec.kwargs)
    except TypeError as e:
        raise EffVisionError(f"model '{spec.name}' rejected its kwargs {spec.kwargs}: {e}") from e
    except Exception as e:  # hub/network failures come in many types
        if not pretrained:
            raise
        raise EffVisionError(f"pretrained weights for '{spec.name}' are not available here: "
                             f"{str(e).strip().splitlines()[0]}") from e
    restore_modes(model, spec.modes, where)
    model._effvision_spec = dataclasses.replace(spec, modes=[])  # the base spec: ev.save needs no arguments
    return model


def similar_model_names(name: str, n: int = 5) -> list[str]:
    """The registered timm names closest to ``name`` (a typo anywhere, not only in the family)."""
    return difflib.get_close_matches(name, timm.list_models(), n=n, cutoff=0.6)


def save_model(model: nn.Module, spec: ModelSpec, directory: str | Path) -> Path:
    """A model dir: model.safetensors, then config.json (timm's hub layout) and model.json (the
    spec with the model's mode record) written last, so a reader that sees model.json finds
    everything it describes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plain = _unwrap(model)
    # The model's own record (set by create_model and every mode's verb); a module effvision never
    # touched keeps the spec's.
    modes = record_of(plain) if hasattr(plain, RECORD_ATTR) else list(spec.modes)
    spec = dataclasses.replace(spec, modes=modes)
    state = {k: v.detach().contiguous().cpu() for k, v in plain.state_dict().items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(directory / WEIGHTS_FILE)
    atomic_write_text(directory / TIMM_CONFIG_FILE, json.dumps(timm_config(spec), indent=2))
    atomic_write_text(directory / SPEC_FILE, spec.to_json())
    return directory


def timm_config(spec: ModelSpec) -> dict[str, Any]:
    """The model dir's ``config.json`` in timm's hub layout (architecture, num_classes, label
    names, model_args and pretrained_cfg with the input size and normalization), so timm and
    tools built on it load a dense model dir as ``timm.create_model("local-dir:DIR",
    pretrained=True)``. Written here rather than by timm's ``save_config_for_hf``, whose
    arguments differ across the timm 1.0.x releases effvision supports. A model with modes (pruned
    shapes, fake-quant layers, ...) is not a plain timm architecture: ``effvision.models.load_model(DIR)``
    rebuilds it."""
    cfg: dict[str, Any] = {
        "architecture": spec.name,
        "num_classes": spec.num_classes,
        "model_args": {**spec.kwargs, "in_chans": spec.in_chans},
        "pretrained_cfg": {"input_size": [spec.in_chans, spec.img_size, spec.img_size], "mean": list(spec.mean),
                           "std": list(spec.std), "crop_pct": 1.0, "interpolation": "bilinear",
                           "num_classes": spec.num_classes},
    }
    if spec.class_names:
        cfg["label_names"] = list(spec.class_names)
    if spec.modes:
        # Not a plain timm checkpoint: timm's strict load would fail on it; effvision rebuilds it.
        cfg["effvision"] = {"modes": [m["mode"] for m in spec.modes], "load_with": "effvision.models.load_model(DIR)"}
    return cfg


def read_spec(directory: str | Path) -> ModelSpec:
    """The spec of a model dir (a dir written before the mode record is migrated, quant.json included)."""
    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        raise EffVisionError(f"no model in {directory} (expected {SPEC_FILE} and {WEIGHTS_FILE})")
    data = read_json_object(spec_path, "model spec")
    quant = None
    if "modes" not in data and (directory / LEGACY_QUANT_FILE).is_file():
        quant = read_json_object(directory / LEGACY_QUANT_FILE, "quantization record")
        if quant.get("version") != 1:
            raise EffVisionError(f"{directory / LEGACY_QUANT_FILE}: unsupported version {quant.get('version')!r} "
                                 f"(this effvision reads 1)")
    return ModelSpec.from_dict(data, quant, where=str(spec_path))


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec]:
    """(model, spec) of a model dir: the timm model, its modes replayed, its weights loaded strictly."""
    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).is_file():
        raise EffVisionError(f"no model in {directory} (expected {SPEC_FILE} and {WEIGHTS_FILE})")
    spec = read_spec(directory)
    model = create_model(spec, where=str(directory / SPEC_FILE))
    load_weights(model, directory / WEIGHTS_FILE, map_location)
    return model, spec


def spec_of_model(model: nn.Module) -> ModelSpec | None:
    """The spec a model was built from by ``create_model``/``load_model``, with its current record."""
    plain = _unwrap(model)
    base = getattr(plain, "_effvision_spec", None)
    return None if base is None else dataclasses.replace(base, modes=record_of(plain))


def load_weights(model: nn.Module, path: str | Path, map_location: str | torch.device = "cpu", prefix: str = "") -> None:
    """Load safetensors weights strictly; corrupt files and shape mismatches are user errors."""
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise EffVisionError(f"corrupt checkpoint {path}: {e}") from e
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        _unwrap(model).load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
        raise EffVisionError(f"checkpoint {path} does not match the model: {detail}") from e


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
