"""Training checkpoints: weights in safetensors, the rest (optimizer, scheduler, RNG, data
position) in a torch file read back with ``weights_only=True``.

Each checkpoint is a directory written under a temporary name and renamed into place; the
file ``latest`` (itself replaced atomically) names the newest complete one. A process killed
at any moment leaves either the previous checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import io
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..errors import EffVisionError
from ..io import atomic_write_text
from ..models.io import _unwrap, load_weights

__all__ = ["Checkpointer", "TrainPosition"]

_LATEST = "latest"
_WEIGHTS = "weights.safetensors"
_EMA = "ema.safetensors"
_STATE = "state.pt"
_STEP_DIR = re.compile(r"step-[0-9]+")  # what ``latest`` may name: a checkpoint folder beside it, nothing else


def _write(path: Path, data: bytes | memoryview) -> None:
    """Plain file I/O, so a full disk is an OSError naming the file (safetensors' and torch's own
    writers report it as SafetensorError or an "unexpected pos" RuntimeError). No fsync: the
    rename makes a checkpoint whole for any process kill; an OS crash is not covered (README)."""
    with open(path, "wb") as f:
        f.write(data)


@dataclass
class TrainPosition:
    epoch: int = 0        # epoch being trained
    step: int = 0         # next step within that epoch
    global_step: int = 0  # optimizer updates so far


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 1) -> None:
        self.dir = Path(directory)
        self.keep = keep

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the one ``latest`` names, else (a kill between the
        rename and the pointer update, or a lost pointer) the highest complete step-* folder."""
        pointer = self.dir / _LATEST
        if pointer.is_file():
            name = pointer.read_bytes().decode("ascii", errors="replace").strip()
            if _STEP_DIR.fullmatch(name) and (self.dir / name / _STATE).is_file():  # a corrupt pointer is a lost one
                return self.dir / name
        complete = sorted(p for p in self.dir.glob("step-*") if (p / _STATE).is_file() and (p / _WEIGHTS).is_file())
        return complete[-1] if complete else None

    def save(self, model: nn.Module | dict[str, torch.Tensor], ema: nn.Module | None, state: dict[str, Any],
             pos: TrainPosition) -> Path:
        """``model``: the module, or its full state dict (gathered from FSDP shards)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{pos.global_step:08d}"
        tmp = self.dir / f".{name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _write(tmp / _WEIGHTS, safetensors_bytes(_state_dict(model)))
            if ema is not None:
                _write(tmp / _EMA, safetensors_bytes(_state_dict(ema)))
            buf = io.BytesIO()
            torch.save({**state, "position": vars(pos).copy()}, buf)
            _write(tmp / _STATE, buf.getbuffer())
        except BaseException:  # a full disk, a kill: the previous checkpoint stays the newest, nothing half-written
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = self.dir / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(self.dir / _LATEST, name)
        self._prune(final)
        return final

    def _prune(self, newest: Path) -> None:
        old = sorted(p for p in self.dir.glob("step-*") if p != newest)
        for p in old[: max(0, len(old) - (self.keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)

    def weights(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path / _WEIGHTS))
        except (SafetensorError, OSError, ValueError) as e:
            raise EffVisionError(f"corrupt checkpoint {path / _WEIGHTS}: {e}") from e

    def load(self, path: Path, model: nn.Module | None, ema: nn.Module | None,
             map_location: torch.device) -> tuple[dict[str, Any], TrainPosition]:
        """The state and position; the weights into ``model`` unless None (FSDP loads its own)."""
        if model is not None:
            load_weights(model, path / _WEIGHTS, map_location)
        if ema is not None and (path / _EMA).is_file():
            load_weights(ema, path / _EMA, map_location)
        try:
            state = torch.load(path / _STATE, map_location=map_location, weights_only=True)
        except Exception as e:  # torch's unpickler fails on damaged bytes with any type (KeyError, struct.error, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EffVisionError(f"corrupt checkpoint state {path / _STATE}: {first}") from e
        return state, _position(state, path / _STATE)


def _position(state: Any, path: Path) -> TrainPosition:
    """The training position ``save`` stored in the state (removed from it): counts, none negative."""
    position = state.pop("position", None) if isinstance(state, dict) else None
    fields = set(vars(TrainPosition()))
    if (not isinstance(position, dict) or set(position) != fields
            or any(type(v) is not int or v < 0 for v in position.values())):
        raise EffVisionError(f"corrupt checkpoint state {path}: no training position in it "
                             f"({', '.join(sorted(fields))}: counts)")
    return TrainPosition(**position)


def _state_dict(model: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = model if isinstance(model, dict) else _unwrap(model).state_dict()
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}
