"""Optimizer state by parameter name, so it survives a change of model (growth): read from a
train stage's checkpoint, saved by the grow stage, loaded by the next train stage.

torch optimizers key their state by position (the n-th parameter of their param groups); a
grown model has other positions, so the state travels keyed by parameter name instead, as a
flat safetensors file (``<param name>::<state key>``; no pickle).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..engine.checkpoint import Checkpointer
from ..engine.optim import OptimizerConfig, create_optimizer
from ..errors import EffVisionError

__all__ = ["STATE_FILE", "checkpoint_optimizer_state", "save_optimizer_state", "load_optimizer_state",
           "carry_optimizer_state"]

STATE_FILE = "optimizer_state.safetensors"
_SEP = "::"
NamedState = dict[str, dict[str, torch.Tensor]]


def param_order(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The optimizer's parameters as names, in its state_dict's index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def checkpoint_optimizer_state(stage_dir: Path, model: nn.Module, cfg: OptimizerConfig) -> NamedState:
    """The optimizer state of a train stage's newest checkpoint, by name. ``model`` has the
    stage's architecture and ``cfg`` is its optimizer: rebuilding that optimizer (timm's
    parameter grouping) gives the index -> name order the checkpoint was written in."""
    path = Checkpointer(Path(stage_dir) / "checkpoints").latest()
    if path is None:
        raise EffVisionError(f"optimizer_state: carry: no training checkpoint in {Path(stage_dir) / 'checkpoints'}")
    saved = torch.load(path / "state.pt", map_location="cpu", weights_only=True)["optimizer"]
    with torch.no_grad():
        order = param_order(create_optimizer(model, cfg), model)
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    if len(ids) != len(order):
        raise EffVisionError(f"optimizer_state: carry: the checkpoint in {path} has {len(ids)} parameters, "
                             f"the model's optimizer {len(order)} (was {Path(stage_dir).name} another model?)")
    return {order[k]: {key: v for key, v in saved["state"][i].items() if isinstance(v, torch.Tensor)}
            for k, i in enumerate(ids) if i in saved["state"]}


def save_optimizer_state(state: NamedState, path: Path) -> Path:
    flat = {f"{name}{_SEP}{key}": torch.as_tensor(v).detach().contiguous().cpu()
            for name, s in state.items() for key, v in s.items()}
    save_file(flat, str(path))
    return path


def load_optimizer_state(path: Path) -> NamedState:
    state: NamedState = {}
    for flat, v in load_file(str(path)).items():
        name, key = flat.rsplit(_SEP, 1)
        state.setdefault(name, {})[key] = v
    return state


def carry_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, prior: Path | None) -> dict[str, Any]:
    """Load the state a grow stage left beside ``prior`` (its model dir) into ``optimizer``, by
    parameter name; parameters without one (inserted blocks) start fresh. Call it after the
    optimizer exists and before training: a resumed stage's own checkpoint then replaces it."""
    path = Path(prior).parent / STATE_FILE if prior is not None else None
    if path is None or not path.is_file():
        return {}
    state = load_optimizer_state(path)
    params = dict(model.named_parameters())
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, s in state.items():
        p = params.get(name)
        if p is None or id(p) not in trained:
            raise EffVisionError(f"{path}: optimizer state for '{name}', which this stage's optimizer does not train")
        # tensors shaped like the parameter follow it (device, dtype); scalars (step) stay as saved
        optimizer.state[p] = {k: v.to(p.device, p.dtype) if v.dim() else v for k, v in s.items()}
    return {"optimizer_state_carried": len(state), "optimizer_state_from": str(path)}


def started_carry(blocks: dict[str, Any], ts: Any, trainer: Any) -> dict[str, Any]:
    """Trainer extension (always on): a model from a grow stage that left its optimizer state
    beside it continues with that state."""
    return carry_optimizer_state(trainer.optimizer, trainer.model, ts.source_dir)
