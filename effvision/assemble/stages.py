"""The modular-training stages. ``grow``: the newest model grown in depth and/or width
(function-preserving) for the next train stage to continue; a growth schedule is train -> grow
-> train -> grow -> train, each train stage's epochs its share of the budget; with
``optimizer_state: carry`` the previous train stage's optimizer state is grown alongside the
weights and the next train stage starts from it. Deep Model Assembling: ``meta`` (train the meta
model), ``incubate`` (train module i of K against the frozen meta model; one job per module,
anywhere), ``assemble`` (collect the module directories, check their hashes, build the target);
then ``finetune`` trains the assembled model."""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..engine import TrainConfig
from ..engine.fit import fit
from ..engine.mode_stage import library_config
from ..engine.stage import MODEL_DIR, Stage, build_recipe_loaders, recipe_spec, stage_dirs
from ..errors import ConfigError, EffVisionError
from ..models.catalog import count_params_macs
from ..models.io import ModelSpec, create_model, load_model, save_model
from .grow import MODE, GrowConfig, check_growth, grow_model, grow_optimizer_state, model_shape
from .modules import (MODULE_FILE, assemble_modules, check_modules, incubation_model, meta_spec, module_blocks,
                      read_module, save_module, spec_hash, target_depth, weights_hash)
from .optimizer_state import STATE_FILE, checkpoint_optimizer_state, save_optimizer_state

__all__ = ["GrowStageConfig", "GrowStage", "MetaConfig", "MetaStage", "IncubateConfig", "IncubateStage",
           "AssembleConfig", "AssembleStage", "MODULE_DIR"]

MODULE_DIR = "module"


@dataclass
class MetaConfig(TrainConfig):
    """The ``meta`` stage (Deep Model Assembling): trains the meta model, the recipe's model with
    one block per module; the other keys are the training config's."""

    type: str = "meta"
    modules: int = 2                  # K: the target's blocks are split into K modules


@dataclass
class IncubateConfig(TrainConfig):
    """The ``incubate`` stage (Deep Model Assembling): trains one module of the target against the
    frozen meta model; one job per module. The other keys are the training config's."""

    type: str = "incubate"
    modules: int = 2                  # K, as in the meta stage
    module: int = 0                   # which module this job trains (0..K-1)
    meta: str = ""                    # a meta model dir; "" = this run's newest earlier meta stage


@dataclass
class AssembleConfig:
    """The ``assemble`` stage (Deep Model Assembling): collects the incubated modules, checks their
    hashes and builds the target model from them."""

    type: str = "assemble"
    modules: list[str] = field(default_factory=list)  # module dirs (or incubate stage dirs); [] = this run's


def _check_split(recipe: Any, modules: int) -> int:
    return len(module_blocks(target_depth(recipe_spec(recipe)), modules)[0])


def _check_meta_dir(meta: Path, recipe: Any, modules: int) -> None:
    """A meta model dir given by path must be the meta model of this recipe's target with K blocks."""
    if not (meta / "model.json").is_file():
        raise EffVisionError(f"meta: no model in {meta}")
    spec = json.loads((meta / "model.json").read_text())
    want = {"name": recipe.model.name, "kwargs": dict(recipe.model.kwargs, depth=modules)}
    have = {"name": spec.get("name"), "kwargs": spec.get("kwargs")}
    if have != want:
        raise EffVisionError(f"meta: {meta} holds {have['name']} {have['kwargs']}, not the meta model of this recipe's "
                             f"target for modules: {modules} ({want['name']} {want['kwargs']})")


def _train(stage: Stage, model, spec: ModelSpec) -> tuple[Any, dict[str, Any]]:
    ctx, cfg = stage.ctx, stage.cfg
    loaders = ctx.loaders(cfg.channels_last, sharded=True)
    result = fit(model, cfg, loaders, device=ctx.device, out_dir=ctx.stage_dir, num_classes=spec.num_classes,
                 spec=spec, seed=ctx.recipe.seed, dist=ctx.dist, augment=ctx.recipe.data.augment, resume=ctx.resume,
                 run_dir=ctx.run_dir, where=ctx.where)
    return result.model, result.metrics


def _data_spec(stage: Stage) -> ModelSpec:
    """The recipe's target spec with the data's classes and normalisation."""
    ctx = stage.ctx
    info = build_recipe_loaders(ctx.recipe, ctx.device, ctx.dist.rank, ctx.dist.world_size).info
    spec = recipe_spec(ctx.recipe, info)
    spec.mean, spec.std = tuple(info.mean), tuple(info.std)
    return spec


class MetaStage(Stage):
    type = "meta"
    Config = MetaConfig
    distributed = True
    resumable = True
    new_record = True  # the meta model is a new model

    @classmethod
    def preflight(cls, cfg: MetaConfig, recipe: Any, index: int) -> None:
        _check_split(recipe, cfg.modules)

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        spec = meta_spec(_data_spec(self), self.cfg.modules)
        model, metrics = _train(self, create_model(spec), spec)
        if self.ctx.dist.is_main:
            save_model(model, spec, self.ctx.stage_dir / MODEL_DIR)
        params_m, gmacs = count_params_macs(model, (spec.in_chans, spec.img_size, spec.img_size))
        return {**metrics, "model": spec.name, "depth": self.cfg.modules, "params_m": params_m, "gmacs": gmacs,
                "meta_hash": weights_hash(self.ctx.stage_dir / MODEL_DIR) if self.ctx.dist.is_main else None,
                "wall_time_s": time.perf_counter() - t0}


class IncubateStage(Stage):
    type = "incubate"
    Config = IncubateConfig
    distributed = True
    resumable = True

    @classmethod
    def preflight(cls, cfg: IncubateConfig, recipe: Any, index: int) -> None:
        _check_split(recipe, cfg.modules)
        if not 0 <= cfg.module < cfg.modules:
            raise EffVisionError(f"module: {cfg.module} is out of range for {cfg.modules} modules (0..{cfg.modules - 1})")
        if cfg.meta:
            _check_meta_dir(Path(cfg.meta), recipe, cfg.modules)
            return
        metas = [s for s in recipe.stages[:index - 1] if s.type == "meta"]
        if not metas:
            raise EffVisionError("incubate needs a meta model: a 'meta' stage before it, or meta: DIR")
        if metas[-1].modules != cfg.modules:
            raise EffVisionError(f"modules: {cfg.modules}, but the meta stage before it has modules: {metas[-1].modules}")

    def _meta_dir(self) -> Path:
        if self.cfg.meta:
            return Path(self.cfg.meta)
        for d in stage_dirs(self.ctx.run_dir, before=self.ctx.index):
            if d.name.endswith("-meta") and (d / MODEL_DIR / "model.json").is_file():
                return d / MODEL_DIR
        raise EffVisionError(f"stage {self.ctx.stage_dir.name}: no finished meta stage in {self.ctx.run_dir}")

    def run(self) -> dict[str, Any]:
        ctx, cfg = self.ctx, self.cfg
        t0 = time.perf_counter()
        meta_dir = self._meta_dir()
        meta, mspec = load_model(meta_dir)
        if len(meta.blocks) != cfg.modules:
            raise EffVisionError(f"meta model {meta_dir} has {len(meta.blocks)} blocks, modules: {cfg.modules}")
        target = dataclasses.replace(mspec, name=ctx.recipe.model.name, kwargs=dict(ctx.recipe.model.kwargs))
        if spec_hash(meta_spec(target, cfg.modules)) != spec_hash(mspec):
            raise EffVisionError(f"meta model {meta_dir} ({mspec.name} {mspec.kwargs}) is not the meta model of "
                                 f"the recipe's target ({target.name} {target.kwargs})")
        model, spec = incubation_model(meta, target, cfg.modules, cfg.module, ctx.recipe.seed)
        model, metrics = _train(self, model, spec)
        meta_hash = weights_hash(meta_dir)
        if ctx.dist.is_main:
            save_module(model, target, cfg.modules, cfg.module, meta_hash, ctx.stage_dir / MODULE_DIR)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {**metrics, "module": cfg.module, "modules": cfg.modules, "meta_hash": meta_hash,
                "target_hash": spec_hash(target), "trainable_params_m": trainable / 1e6,
                "wall_time_s": time.perf_counter() - t0}


def _module_dir(path: Path) -> Path:
    return path / MODULE_DIR if (path / MODULE_DIR / MODULE_FILE).is_file() else path


class AssembleStage(Stage):
    type = "assemble"
    Config = AssembleConfig
    new_record = True  # the assembled target is a new model

    @classmethod
    def preflight(cls, cfg: AssembleConfig, recipe: Any, index: int) -> None:
        for d in cfg.modules:
            if not (_module_dir(Path(d)) / MODULE_FILE).is_file():
                raise EffVisionError(f"modules: no incubated module in {d} (expected {MODULE_FILE}, or {MODULE_DIR}/{MODULE_FILE})")
        if cfg.modules:  # trained elsewhere: their hashes and indices are known now
            check_modules([read_module(_module_dir(Path(d))) for d in cfg.modules])
            return
        jobs = [(i, s) for i, s in enumerate(recipe.stages[:index - 1]) if s.type == "incubate"]
        if not jobs:
            raise EffVisionError("assemble needs modules: list the module dirs, or put incubate stages before it")
        # this run's incubate stages: modules 0..K-1 once each, one K
        check_modules([{"module": s.module, "modules": s.modules, "meta_hash": "", "target_hash": "",
                        "dir": f"stages[{i}]"} for i, s in jobs])

    def run(self) -> dict[str, Any]:
        ctx, cfg = self.ctx, self.cfg
        t0 = time.perf_counter()
        if cfg.modules:
            dirs = [_module_dir(Path(d)) for d in cfg.modules]
        else:
            dirs = [d / MODULE_DIR for d in stage_dirs(ctx.run_dir, before=ctx.index)
                    if d.name.endswith("-incubate") and (d / MODULE_DIR / MODULE_FILE).is_file()][::-1]
        model, spec, info = assemble_modules(dirs)
        if spec_hash(spec) != info["target_hash"]:
            raise EffVisionError(f"modules' target spec does not match its hash {info['target_hash']}")
        save_model(model, spec, ctx.stage_dir / MODEL_DIR)
        params_m, gmacs = count_params_macs(model, (spec.in_chans, spec.img_size, spec.img_size))
        return {**info, "model": spec.name, "kwargs": spec.kwargs, "module_dirs": [str(d) for d in dirs],
                "params_m": params_m, "gmacs": gmacs, "wall_time_s": time.perf_counter() - t0}


@dataclass
class GrowStageConfig(GrowConfig):
    """The ``grow`` stage: the newest model grown in depth and/or width, function-preserving, for the
    next train stage to continue; optionally with the previous train stage's optimizer state grown too."""

    type: str = "grow"
    # reset: the next train stage starts a fresh optimizer; carry: it continues the previous
    # train stage's state, mapped onto the grown model (new blocks start fresh)
    optimizer_state: Literal["reset", "carry"] = "reset"


def _check_carry(recipe: Any, index: int) -> None:
    """carry needs train stages on both sides, with one optimizer whose state growth can map."""
    where = f"stages[{index - 1}].optimizer_state"
    before = recipe.stages[index - 2] if index >= 2 else None
    after = recipe.stages[index] if index < len(recipe.stages) else None
    for side, stage in (("before", before), ("after", after)):
        if stage is None or stage.type != "train":
            raise ConfigError(f"{where}: carry needs a train stage right {side} the grow stage "
                              f"(found {stage.type if stage else 'none'})")
    if before.optimizer.name != after.optimizer.name:
        raise ConfigError(f"{where}: carry needs one optimizer on both sides of the grow stage "
                          f"({before.optimizer.name} before, {after.optimizer.name} after)")
    if before.optimizer.name.startswith("galore_"):
        raise ConfigError(f"{where}: carry cannot grow {before.optimizer.name}'s projected state; use reset")


class GrowStage(Stage):
    type = "grow"
    Config = GrowStageConfig
    mode = MODE

    @classmethod
    def preflight(cls, cfg: GrowStageConfig, recipe: Any, index: int) -> None:
        """A depth below the recipe model's (after earlier grows) fails before any work."""
        if cfg.optimizer_state == "carry":
            _check_carry(recipe, index)
        if recipe.model.init_from:
            return  # the starting depth is only known once that model is loaded (run() checks it)
        with torch.device("meta"):  # shapes only, no memory or init cost
            depth = model_shape(create_model(recipe_spec(recipe)))[0]
        for i, stage in enumerate(recipe.stages[:index], start=1):
            if isinstance(stage, GrowStageConfig):
                depth = check_growth(depth, stage, f"stages[{i - 1}]")

    def run(self) -> dict[str, Any]:
        ctx, cfg = self.ctx, self.cfg
        t0 = time.perf_counter()
        prior = ctx.previous_model_dir()
        model, spec = load_model(prior)
        before = model_shape(model)
        grow_cfg = library_config(cfg, GrowConfig)
        state = None
        if cfg.optimizer_state == "carry":  # read before any output: a missing checkpoint fails cleanly
            train_cfg = ctx.recipe.stages[int(prior.parent.name[:2]) - 1]
            assert isinstance(train_cfg, TrainConfig), train_cfg  # preflight: a train stage precedes
            state = grow_optimizer_state(checkpoint_optimizer_state(prior.parent, model, train_cfg.optimizer),
                                         model, grow_cfg)
        grown, new_spec = grow_model(model, spec, grow_cfg)
        # the function is unchanged: check it on a random batch before saving anything
        x = torch.randn(2, spec.in_chans, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(0))
        err = (model.eval()(x) - grown.eval()(x)).abs().max().item()
        ctx.save_model(grown, new_spec)
        if state is not None:
            save_optimizer_state(state, ctx.stage_dir / STATE_FILE)
        params_m, gmacs = count_params_macs(grown, (spec.in_chans, spec.img_size, spec.img_size))
        depth, dim, heads = model_shape(grown)
        return {"model": new_spec.name, "kwargs": new_spec.kwargs, "depth": [before[0], depth],
                "embed_dim": [before[1], dim], "num_heads": [before[2], heads], "max_abs_output_change": err,
                "optimizer_state": cfg.optimizer_state, "optimizer_state_params": len(state or {}),
                "params_m": params_m, "gmacs": gmacs, "wall_time_s": time.perf_counter() - t0}
