"""A detector moves between stages as detector.json (what to rebuild: detector kind, the
backbone's ModelSpec, classes, sizes) plus model.safetensors, never as a pickle."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors.torch import save_file

from ..attention import apply_policies
from ..errors import EffVisionError
from ..io import atomic_write_text
from ..models.io import WEIGHTS_FILE, ModelSpec, create_model, load_weights
from .backbone import backbone as make_backbone
from .detectors import build_detector

__all__ = ["DetectorSpec", "DETECTOR_FILE", "DETECTOR_DIR", "build_from_spec", "save_detector", "load_detector"]

DETECTOR_FILE = "detector.json"
DETECTOR_DIR = "detector"   # a detection stage's output folder (beside a classification stage's model/)


@dataclass
class DetectorSpec:
    kind: str
    backbone: dict[str, Any]                 # the trunk's ModelSpec as a dict
    num_classes: int                         # object classes + 1 (background)
    categories: list[dict[str, Any]] = field(default_factory=list)  # [{id, name}] for labels 1..K
    out_channels: int = 256
    min_size: int = 512
    max_size: int = 853
    fixed_size: list[int] | None = None      # (H, W)
    options: dict[str, Any] = field(default_factory=dict)  # build_detector extras (representation_size, ...)
    attention: dict[str, Any] | None = None  # the backbone's sparse-attention policies (sparse_attention stage)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def build_from_spec(spec: DetectorSpec, trunk: nn.Module | None = None) -> nn.Module:
    """The detector a spec describes (random weights unless ``trunk`` carries some)."""
    trunk_spec = ModelSpec.from_dict(spec.backbone)
    body = make_backbone(trunk if trunk is not None else create_model(trunk_spec), spec=trunk_spec,
                         out_channels=spec.out_channels)
    model = build_detector(spec.kind, body, spec.num_classes, min_size=spec.min_size, max_size=spec.max_size,
                           fixed_size=tuple(spec.fixed_size) if spec.fixed_size else None, **spec.options)
    if spec.attention is not None:
        apply_policies(model.backbone, spec.attention)
    return model


def save_detector(model: nn.Module, spec: DetectorSpec, directory: str | Path) -> Path:
    # No model.json here: this folder is not a classifier that load_model could rebuild.
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(directory / WEIGHTS_FILE)
    atomic_write_text(directory / DETECTOR_FILE, spec.to_json())
    return directory


def load_detector(directory: str | Path) -> tuple[nn.Module, DetectorSpec]:
    directory = Path(directory)
    path = directory / DETECTOR_FILE
    if not path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise EffVisionError(f"no detector in {directory} (expected {DETECTOR_FILE} and {WEIGHTS_FILE})")
    try:
        data = json.loads(path.read_text())
        spec = DetectorSpec(**data)
    except (json.JSONDecodeError, TypeError) as e:
        raise EffVisionError(f"corrupt detector spec {path}: {e}") from e
    model = build_from_spec(spec)
    load_weights(model, directory / WEIGHTS_FILE)
    return model, spec
