"""Recipes for people who start from a model, not a recipe: ``effvision prune DIR`` and
``effvision quantize DIR`` write the one-stage recipe for a saved model dir (its architecture,
input size and normalization from the dir's spec) and run it. The run dir keeps the recipe, so
``effvision run RUN/recipe.yaml`` reruns it and it can be edited like any other."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import EffVisionError
from .models.io import SPEC_FILE, read_spec

__all__ = ["model_dir_recipe"]


def model_dir_recipe(model_dir: str | Path, stages: list[dict[str, Any]], data: str, data_root: str | None,
                     batch_size: int, device: str) -> dict[str, Any]:
    """A recipe whose model is ``model_dir`` (model.init_from) and whose data matches it."""
    model_dir = Path(model_dir)
    if not (model_dir / SPEC_FILE).is_file():
        raise EffVisionError(f"no model in {model_dir} (expected {SPEC_FILE}; a `model` folder of a run, "
                             f"or one saved with effvision.save)")
    spec = read_spec(model_dir)
    data_cfg: dict[str, Any] = {"name": data, "img_size": spec.img_size, "batch_size": batch_size,
                                "mean": list(spec.mean), "std": list(spec.std)}
    if data_root is not None:
        data_cfg["root"] = data_root
    return {"name": f"{model_dir.parent.name or 'model'}-{stages[0]['type']}", "seed": 0, "device": device,
            "model": {"name": spec.name, "kwargs": dict(spec.kwargs), "init_from": str(model_dir)},
            "data": data_cfg, "stages": stages}
