"""Chosen policies on disk: attention_policies.json in the model dir (like quant.json), re-applied
by ``effvision.models.io.load_model`` before the weights load."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import EffVisionError
from ..io import atomic_write_text

__all__ = ["POLICY_FILE", "write_policies", "read_policies"]

POLICY_FILE = "attention_policies.json"
_VERSION = 1


def write_policies(directory: str | Path, spec: dict[str, Any]) -> Path:
    path = Path(directory) / POLICY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"version": _VERSION, **spec}, indent=1))
    return path


def read_policies(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / POLICY_FILE
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EffVisionError(f"corrupt attention policies {path}: {e}") from None
    if spec.get("version") != _VERSION:
        raise EffVisionError(f"{path}: unsupported version {spec.get('version')} (this effvision reads {_VERSION})")
    return spec
