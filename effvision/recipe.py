"""Recipes: YAML -> typed config. A recipe names a model, the data, and a list of stages."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import apply_overrides, load_yaml, parse, to_dict
from .data.config import DataConfig
from .errors import ConfigError

__all__ = ["ModelConfig", "Recipe", "load_recipe", "parse_recipe", "recipe_to_dict"]

MAX_THREADS = 4096  # more is a typo, not a machine (2**70 would overflow torch's C int)


@dataclass
class ModelConfig:
    """The recipe's model: a timm model name with its constructor arguments, and the weights it starts from."""

    name: str = "vit_micro_patch4_32"        # any timm model name (effvision's own included)
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model (drop_path_rate, ...)
    pretrained: bool = False                 # timm pretrained weights (needs a hub; off on offline machines)
    init_from: str | None = None             # safetensors file (or effvision model dir) to start from


@dataclass
class Recipe:
    """A whole recipe: run settings (name, seed, device, determinism, threads), the model, the
    data, and the list of stages, each parsed into its stage type's config."""

    name: str = "run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = False              # torch.use_deterministic_algorithms (bit-exact CPU resumes)
    threads: int | None = None               # torch intra-op threads (CPU)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[Any] = field(default_factory=list)  # stage configs, parsed by their registered type

    def validate(self, where: str) -> None:
        if self.threads is not None and not 0 < self.threads <= MAX_THREADS:
            raise ConfigError(f"threads must be positive and at most {MAX_THREADS} (or left out)")
        if not -2**63 <= self.seed < 2**64:  # what torch.manual_seed takes
            raise ConfigError("seed must fit in 64 bits")


def parse_recipe(data: dict[str, Any]) -> Recipe:
    from .stages import stage_types

    STAGES = stage_types()
    if not isinstance(data, dict):
        raise ConfigError(f"recipe: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    raw_stages = data.pop("stages", None)
    recipe = parse(Recipe, data)
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError("stages: a recipe needs a non-empty list of stages")
    for i, raw in enumerate(raw_stages):
        where = f"stages[{i}]"
        if not isinstance(raw, dict) or "type" not in raw:
            raise ConfigError(f"{where}: each stage is a mapping with a 'type' ({', '.join(STAGES)})")
        kind = raw["type"]
        if not isinstance(kind, str) or kind not in STAGES:
            close = difflib.get_close_matches(str(kind), list(STAGES), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(STAGES)}"
            raise ConfigError(f"{where}.type: unknown stage '{kind}'{hint}")
        recipe.stages.append(parse(STAGES[kind].config_class(), raw, where))
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    return parse_recipe(apply_overrides(load_yaml(path), overrides))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return to_dict(recipe)
