"""The generic stage of a mode: load the previous stage's model, apply the mode's verb
(``Mode.convert``), evaluate before and after, save. A technique whose stage needs nothing more
registers one line::

    register_stage(mode_stage("reduce_tokens", register_mode(Mode("reduce_tokens", ...))))

The stage's config is the mode's config dataclass plus the stage ``type`` (so its recipe keys
are the config's fields, defaults and checks included); the verb receives a plain instance of
that config (``library_config``).
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from typing import Any

from ..models.modes import Mode
from .evaluate import evaluate
from .stage import Stage

__all__ = ["mode_stage", "library_config"]


def library_config(cfg: Any, config: type) -> Any:
    """The ``config`` dataclass with the values of ``cfg`` (a stage config built on it): what a
    technique's verb and its mode record get, without the stage's own fields."""
    return config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(config) if f.init})


def mode_stage(type_name: str, mode: Mode, *, calib_batches: int = 0,
               preflight: Callable[[Any, Any, int], None] | None = None, doc: str = "") -> type[Stage]:
    """A Stage class for ``mode``, whose ``convert(model, cfg, calib)`` changes the model in place
    (and adds the mode to its record); ``calib_batches`` > 0 gives it that many training batches'
    images. ``preflight(cfg, recipe, index)`` checks the config before any work."""
    if mode.config is None or mode.convert is None:
        raise ValueError(f"mode {mode.name}: a generic stage needs the mode's config and convert")
    config, convert = mode.config, mode.convert
    stage_config = dataclasses.make_dataclass(
        f"{type_name.title().replace('_', '')}StageConfig", [("type", str, dataclasses.field(default=type_name))],
        bases=(config,), namespace={"__module__": config.__module__})

    class ModeStage(Stage):
        __doc__ = doc or f"The {type_name} stage: the previous model with mode {mode.name} applied, evaluated before/after."
        type = type_name
        Config = stage_config

        @classmethod
        def preflight(cls, cfg: Any, recipe: Any, index: int) -> None:
            if preflight is not None:
                preflight(library_config(cfg, config), recipe, index)

        def run(self) -> dict[str, Any]:
            t0 = time.perf_counter()
            ctx = self.ctx
            model, spec = ctx.previous_model(on_device=True)
            loaders = ctx.loaders()
            calib = [x for x, _ in itertools.islice(loaders.train.epoch(0), calib_batches)] if calib_batches else None
            before = evaluate(model.eval(), loaders.eval, ctx.device, "off")
            report = convert(model, library_config(self.cfg, config), calib)
            after = evaluate(model.eval(), loaders.eval, ctx.device, "off")
            ctx.save_model(model, spec)
            return {"top1": after["top1"], "before": before, "after": after, **report, "model": spec.name,
                    "wall_time_s": time.perf_counter() - t0}

    ModeStage.mode = mode.name
    ModeStage.__name__ = ModeStage.__qualname__ = f"{type_name.title().replace('_', '')}Stage"
    return ModeStage
