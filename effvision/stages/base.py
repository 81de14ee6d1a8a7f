"""Stages: small classes registered by name; a recipe is a list of them over one run dir.

Each stage writes only into its own directory ``run_dir/NN-<type>/`` and marks completion
by writing ``summary.json`` last; a stage that makes a model writes it to ``model/`` as
spec + safetensors, and later stages read the newest earlier one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..engine.distributed import DistInfo
from ..errors import EffVisionError

__all__ = ["Stage", "StageContext", "STAGES", "register_stage", "stage_dirs", "SUMMARY_FILE", "MODEL_DIR"]

SUMMARY_FILE = "summary.json"
MODEL_DIR = "model"
STAGES: dict[str, type["Stage"]] = {}
_STAGE_DIR = re.compile(r"^\d\d-[a-z_]+$")  # NN-<type>; not NN-<type>.incomplete-<time>


def stage_dirs(run_dir: Path, before: int | None = None) -> list[Path]:
    """A run's stage directories, newest first (optionally only those before index ``before``)."""
    dirs = [d for d in Path(run_dir).iterdir() if d.is_dir() and _STAGE_DIR.match(d.name)] if Path(run_dir).is_dir() else []
    return sorted((d for d in dirs if before is None or int(d.name[:2]) < before), reverse=True)


@dataclass
class StageContext:
    recipe: Any                 # effvision.recipe.Recipe
    run_dir: Path
    stage_dir: Path
    index: int
    device: torch.device
    dist: DistInfo
    resume: bool = False

    def previous_model_dir(self, required: bool = True) -> Path | None:
        """The model directory of the newest earlier stage that produced one."""
        for d in stage_dirs(self.run_dir, before=self.index):
            if (d / MODEL_DIR / "model.json").is_file():
                return d / MODEL_DIR
        if not required:  # train/finetune/detection build from model.init_from themselves
            return None
        init = self.recipe.model.init_from
        if init and (Path(init) / "model.json").is_file():  # e.g. a prune stage first, on a saved model
            return Path(init)
        raise EffVisionError(f"stage {self.stage_dir.name} needs a model, but no earlier stage made one "
                             f"(put a 'train' stage, or set model.init_from, before it)")

    def previous_stage_file(self, name: str) -> Path | None:
        """The newest earlier stage's file ``name`` (e.g. the export stage's model.onnx)."""
        for d in stage_dirs(self.run_dir, before=self.index):
            if (d / name).is_file():
                return d / name
        return None


class Stage:
    type: ClassVar[str]
    Config: ClassVar[type]
    distributed: ClassVar[bool] = False  # runs on every torchrun process (else on rank 0 only)
    resumable: ClassVar[bool] = False    # continues from its own checkpoints on --resume

    def __init__(self, cfg: Any, ctx: StageContext) -> None:
        self.cfg, self.ctx = cfg, ctx

    def run(self) -> dict[str, Any]:
        """Do the work; return the summary (written to summary.json by the pipeline)."""
        raise NotImplementedError


def register_stage(cls: type[Stage]) -> type[Stage]:
    STAGES[cls.type] = cls
    return cls
