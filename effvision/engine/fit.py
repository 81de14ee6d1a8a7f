"""``fit``: the one place a Trainer is built. Every stage that trains (train, finetune, QAT,
recovery between pruning steps, early exit heads, modular training) and ``effvision.train``
come through here, so the registered trainer extensions (token_drop, curriculum, distillation,
...) set up the same way wherever their config keys appear."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..data.build import Loaders
from ..data.config import AugmentConfig
from ..models.io import ModelSpec
from .config import TrainConfig
from .distributed import DistInfo
from .extensions import TrainSetup, extension_blocks, extensions
from .hooks import Hooks
from .trainer import Trainer

__all__ = ["fit", "FitResult"]


@dataclass
class FitResult:
    model: nn.Module            # the trained model to keep (EMA weights if configured), unwrapped
    metrics: dict[str, Any]     # last evaluation and throughput
    train_time_s: float
    summary: dict[str, Any]     # what the extensions report (teacher, token counts, carried state...)


def fit(model: nn.Module, cfg: TrainConfig, loaders: Loaders, *, device: torch.device, out_dir: Path,
        num_classes: int, spec: ModelSpec | None = None, seed: int = 0, dist: DistInfo | None = None,
        augment: AugmentConfig | None = None, hooks: Hooks | None = None, resume: bool = False,
        run_dir: Path | None = None, source_dir: Path | None = None, where: str = "train",
        wrap: Callable[[TrainSetup], None] | None = None, progress: bool = True) -> FitResult:
    """Train ``model`` by ``cfg``: the extensions whose keys ``cfg`` sets (and ``wrap``, a caller's
    own setup step, run first) prepare the model, data and hooks; then the Trainer runs."""
    ts = TrainSetup(model=model, spec=spec, cfg=cfg, loaders=loaders, hooks=hooks or Hooks(), device=device,
                    seed=seed, dist=dist or DistInfo(), run_dir=run_dir, source_dir=source_dir, where=where)
    if wrap is not None:
        wrap(ts)
    active = [(e, extension_blocks(cfg, e)) for e in extensions()]
    active = [(e, b) for e, b in active if e.always or any(v is not None for v in b.values())]
    for ext, blocks in active:
        ext.setup(blocks, ts)
    trainer = Trainer(ts.stepped(), ts.cfg, ts.loaders, device=device, out_dir=out_dir, num_classes=num_classes,
                      seed=seed, dist=ts.dist, augment=augment, hooks=ts.hooks, progress=progress)
    for ext, blocks in active:
        if ext.started is not None:
            ts.summary.update(ext.started(blocks, ts, trainer))
    result = trainer.fit(resume=resume)
    return FitResult(model=ts.unwrap(result.model), metrics=result.metrics, train_time_s=result.train_time_s,
                     summary=ts.summary)
