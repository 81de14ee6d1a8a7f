"""Models move between stages and processes as an architecture spec (JSON) plus safetensors
weights, never as pickles, so any stage's model rebuilds in a fresh process."""
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

from ..errors import EffVisionError
from ..io import atomic_write_text

__all__ = ["ModelSpec", "create_model", "save_model", "load_model", "timm_config", "SPEC_FILE", "WEIGHTS_FILE",
           "TIMM_CONFIG_FILE"]

SPEC_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"  # also the name timm's hub layout uses
TIMM_CONFIG_FILE = "config.json"    # timm's hub layout: timm.create_model("local-dir:DIR", pretrained=True)


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model and feed it: the timm name and its kwargs, and the
    preprocessing and class names that export manifests and evaluation need."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 10
    img_size: int = 32
    in_chans: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    class_names: list[str] = field(default_factory=list)
    # Pruned models: tensor shapes and module attributes that differ from the dense model
    # (effvision.compress.arch); None for a dense model.
    pruned: dict[str, Any] | None = None
    # Model transforms re-applied in order after pruning, before quantization
    # (effvision.models.transforms): [{"name": registered name, **params}, ...]
    transforms: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def create_model(spec: ModelSpec, pretrained: bool = False) -> nn.Module:
    """``timm.create_model`` with a clear error for unknown names."""
    import effvision.models.small_vit  # noqa: F401  (registration)

    if not timm.is_model(spec.name):
        close = similar_model_names(spec.name)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise EffVisionError(f"unknown model '{spec.name}'{hint} (see `effvision models`)")
    try:
        model = timm.create_model(spec.name, pretrained=pretrained and not spec.pruned,
                                  num_classes=spec.num_classes, in_chans=spec.in_chans, **spec.kwargs)
    except TypeError as e:
        raise EffVisionError(f"model '{spec.name}' rejected its kwargs {spec.kwargs}: {e}") from None
    except Exception as e:  # hub/network failures come in many types
        if not pretrained:
            raise
        raise EffVisionError(f"pretrained weights for '{spec.name}' are not available here: "
                             f"{str(e).strip().splitlines()[0]}") from None
    if spec.pruned:
        from ..compress.arch import apply_pruned

        apply_pruned(model, spec.pruned)
    if spec.transforms:
        from .transforms import apply_transforms

        apply_transforms(model, spec.transforms)
    return model


def similar_model_names(name: str, n: int = 5) -> list[str]:
    """The registered timm names closest to ``name`` (a typo anywhere, not only in the family)."""
    return difflib.get_close_matches(name, timm.list_models(), n=n, cutoff=0.6)


def save_model(model: nn.Module, spec: ModelSpec, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(directory / WEIGHTS_FILE)
    # A quantized dir (quant.json written first) holds fake-quant parameters timm does not know.
    quantized = (directory / "quant.json").is_file()
    atomic_write_text(directory / TIMM_CONFIG_FILE, json.dumps(timm_config(spec, quantized), indent=2))
    atomic_write_text(directory / SPEC_FILE, spec.to_json())
    return directory


def timm_config(spec: ModelSpec, quantized: bool = False) -> dict[str, Any]:
    """The model dir's ``config.json`` in timm's hub layout (architecture, num_classes, label
    names, model_args and pretrained_cfg with the input size and normalization), so timm and
    tools built on it load a dense model dir as ``timm.create_model("local-dir:DIR",
    pretrained=True)``. Written here rather than by timm's ``save_config_for_hf``, whose
    arguments differ across the timm 1.0.x releases effvision supports. A pruned model's
    shapes are not a timm architecture: ``effvision.models.load_model(DIR)`` rebuilds it."""
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
    if spec.pruned or quantized:
        # Not a plain timm checkpoint: timm's strict load would fail on it; effvision rebuilds it.
        cfg["effvision"] = {"pruned": bool(spec.pruned), "quantized": quantized,
                            "load_with": "effvision.models.load_model(DIR)"}
    return cfg


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec]:
    directory = Path(directory)
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    if not spec_path.is_file() or not weights_path.is_file():
        raise EffVisionError(f"no model in {directory} (expected {SPEC_FILE} and {WEIGHTS_FILE})")
    try:
        spec = ModelSpec.from_json(spec_path.read_text(encoding="utf-8"))
    except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise EffVisionError(f"corrupt model spec {spec_path}: {e}") from None
    model = create_model(spec)
    from ..compress.quantize.persist import apply_quant_spec, read_quant_spec  # quantized: fake-quant modules first

    quant = read_quant_spec(directory)
    if quant is not None:
        apply_quant_spec(model, quant)
    load_weights(model, weights_path, map_location)
    return model, spec


def load_weights(model: nn.Module, path: str | Path, map_location: str | torch.device = "cpu", prefix: str = "") -> None:
    """Load safetensors weights strictly; corrupt files and shape mismatches are user errors."""
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise EffVisionError(f"corrupt checkpoint {path}: {e}") from None
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        _unwrap(model).load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
        raise EffVisionError(f"checkpoint {path} does not match the model: {detail}") from None


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
