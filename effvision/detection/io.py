"""A detector moves between stages as detector.json (what to rebuild: detector kind, the
backbone's ModelSpec, classes, sizes, the record of modes applied to the detector) plus
model.safetensors, never as a pickle.

Rebuilding follows the order the changes were made in: the detector over a fresh trunk, then
its ``modes`` (``models.modes`` entries, e.g. the ``prune`` of effvision.detection.prune:
recorded shapes relative to the whole detector), then the sparse-attention ``attention``
policies (profiled on the detector as pruned), then the weights."""
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
from ..models.modes import RECORD_ATTR, record_of, restore_modes
from .backbone import backbone as make_backbone
from .detectors import build_detector

__all__ = ["DetectorSpec", "DETECTOR_FILE", "DETECTOR_DIR", "DETECTOR_MODES", "build_from_spec", "save_detector",
           "load_detector"]

DETECTOR_FILE = "detector.json"
DETECTOR_DIR = "detector"   # a detection stage's output folder (beside a classification stage's model/)
# The modes whose restore works on a whole detector (the others rebuild a timm classifier's parts).
DETECTOR_MODES = ("prune",)


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
    # what was done to the detector, oldest first: models.modes entries {"mode", "version", "config",
    # "metadata"} (prune_detection: "prune", shapes relative to the whole detector); [] for a dense one
    modes: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def build_from_spec(spec: DetectorSpec, trunk: nn.Module | None = None, where: str = "detector spec") -> nn.Module:
    """The detector a spec describes (random weights unless ``trunk`` carries some): built over the
    dense trunk, then its modes replayed in order, then its sparse-attention policies applied.
    ``where`` names the spec in errors (its detector.json)."""
    _check_spec(spec, where)
    trunk_spec = ModelSpec.from_dict(spec.backbone, where=f"{where} backbone")
    body = make_backbone(trunk if trunk is not None else create_model(trunk_spec, where=f"{where} backbone"),
                         spec=trunk_spec, out_channels=spec.out_channels)
    model = build_detector(spec.kind, body, spec.num_classes, min_size=spec.min_size, max_size=spec.max_size,
                           fixed_size=tuple(spec.fixed_size) if spec.fixed_size else None, **spec.options)
    restore_modes(model, spec.modes, where)  # pruned shapes first: the policies below are per pruned head
    if spec.attention is not None:
        apply_policies(model.backbone, spec.attention)
    return model


def _check_spec(spec: DetectorSpec, where: str) -> None:
    """One-line errors for what build_from_spec cannot read (a hand-edited or foreign detector.json)."""
    if not isinstance(spec.backbone, dict) or not isinstance(spec.backbone.get("name"), str):
        raise EffVisionError(f"{where}: 'backbone' is not a model spec (a JSON object with a 'name'), got "
                             f"{type(spec.backbone).__name__}")
    if not isinstance(spec.modes, list) or not all(isinstance(e, dict) for e in spec.modes):
        raise EffVisionError(f"{where}: 'modes' is not a list of JSON objects")
    for entry in spec.modes:
        if entry.get("mode") not in DETECTOR_MODES:
            raise EffVisionError(f"{where}: unknown detector mode {entry.get('mode')!r} in 'modes' (known: "
                                 f"{', '.join(DETECTOR_MODES)}); the detector was made by a newer effvision")


def save_detector(model: nn.Module, spec: DetectorSpec, directory: str | Path) -> Path:
    """model.safetensors, then detector.json (the spec with the detector's own mode record when it
    carries one, as save_model does), written last. No model.json here: this folder is not a
    classifier that load_model could rebuild."""
    if hasattr(model, RECORD_ATTR):  # built by build_from_spec or changed by a mode's verb (prune_detector_)
        spec = dataclasses.replace(spec, modes=record_of(model))
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
        if not isinstance(data, dict):
            raise TypeError(f"a JSON object expected, got {type(data).__name__}")
        if "backbone" not in data:
            raise EffVisionError(f"{path}: no 'backbone' record (the trunk's model spec); not a detector spec")
        spec = DetectorSpec(**data)  # a file without 'modes' (before the record) is a dense detector
    except (json.JSONDecodeError, TypeError) as e:
        raise EffVisionError(f"corrupt detector spec {path}: {e}") from e
    model = build_from_spec(spec, where=str(path))
    load_weights(model, directory / WEIGHTS_FILE)
    return model, spec
