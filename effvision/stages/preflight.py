"""Checks of a whole recipe before its run directory is touched: the model name, the data, each
stage's own inputs, and the order of the modes its stages apply (``models.modes``: a
combination that cannot work is refused here, with the rule it breaks)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine.stage import model_norm, stage_types
from ..errors import EffVisionError
from ..models.io import SPEC_FILE, read_spec
from ..models.modes import ModeRuleError, check_next

__all__ = ["preflight", "planned_modes"]


def planned_modes(recipe: Any) -> list[tuple[int, str]]:
    """(stage index, mode) in the order the recipe's stages apply them to its model, starting from
    ``model.init_from``'s record; raises ModeRuleError at the first mode that may not follow."""
    init = recipe.model.init_from
    done = [m["mode"] for m in read_spec(init).modes] if init and (Path(init) / SPEC_FILE).is_file() else []
    plan: list[tuple[int, str]] = [(0, m) for m in done]
    stages = stage_types()
    for index, cfg in enumerate(recipe.stages, start=1):
        cls = stages[cfg.type]
        if cls.new_record:
            done, plan = [], []
        for mode in cls.modes(cfg):
            try:
                check_next(done, mode)
            except ModeRuleError as e:
                raise ModeRuleError(f"stages[{index - 1}] ({cfg.type}): {e}") from e
            done.append(mode)
            plan.append((index, mode))
    return plan


def preflight(recipe: Any) -> None:
    """Cheap checks of the user's inputs before a run directory is touched."""
    model_norm(recipe)  # raises the clear error for an unknown model name
    data = recipe.data
    if data.name != "digits" and data.root is not None and not Path(data.root).exists() and not data.download:
        raise EffVisionError(f"dataset not found: {data.root} (data.root of '{data.name}')")
    if recipe.model.init_from and not Path(recipe.model.init_from).exists():
        raise EffVisionError(f"model.init_from not found: {recipe.model.init_from}")
    planned_modes(recipe)
    stages = stage_types()
    for index, cfg in enumerate(recipe.stages, start=1):  # stages that check their own inputs
        stages[cfg.type].preflight(cfg, recipe, index)
