"""Training checkpoints: weights in safetensors, the rest (optimizer, scheduler, RNG, data
position) in a torch file read back with ``weights_only=True``.

Each checkpoint is a directory written under a temporary name and renamed into place; the
file ``latest`` (itself replaced atomically) names the newest complete one. A process killed
at any moment leaves either the previous checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
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


def _write(path: Path, data: bytes | memoryview) -> None:
    """Plain file I/O, so a full disk is an OSError naming the file (safetensors' and torch's own
    writers report it as SafetensorError or an "unexpected pos" RuntimeError)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
            path = self.dir / pointer.read_text().strip()
            if (path / _STATE).is_file():
                return path
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
        return load_file(str(path / _WEIGHTS))

    def load(self, path: Path, model: nn.Module | None, ema: nn.Module | None,
             map_location: torch.device) -> tuple[dict[str, Any], TrainPosition]:
        """The state and position; the weights into ``model`` unless None (FSDP loads its own)."""
        if model is not None:
            load_weights(model, path / _WEIGHTS, map_location)
        if ema is not None and (path / _EMA).is_file():
            load_weights(ema, path / _EMA, map_location)
        try:
            state = torch.load(path / _STATE, map_location=map_location, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
            raise EffVisionError(f"corrupt checkpoint state {path / _STATE}: {str(e).splitlines()[0]}") from e
        return state, TrainPosition(**state.pop("position"))


def _state_dict(model: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = model if isinstance(model, dict) else _unwrap(model).state_dict()
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}
