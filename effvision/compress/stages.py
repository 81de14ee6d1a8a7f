"""The compression stages. ``prune``: the newest model, structurally pruned (targets: ``ratio``
or per-kind ``heads``/``mlp``/``width``/``channels``, or a ``budget`` of params, MACs or
measured latency as a fraction of dense; ``steps`` > 1 prunes iteratively with
``recover_epochs`` of fine-tuning in between; everything is checked by ``preflight`` on the
recipe's model, a dry run on a copy, before the run directory is touched). ``quantize``:
post-training quantization calibrated on the training split, optional accuracy-budgeted
fallback, optional QAT, optional measured INT8 layers."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
import torch.nn as nn

from ..engine import TrainConfig
from ..engine.config import SchedulerConfig
from ..engine.evaluate import evaluate
from ..engine.fit import fit
from ..engine.mode_stage import library_config
from ..engine.optim import OptimizerConfig
from ..engine.stage import Stage, recipe_spec
from ..errors import ConfigError, EffVisionError
from ..io import atomic_write_json
from ..models.io import create_model
from .budget import BudgetSpec, LatencyTable, latency_fraction, search_ratio
from .halp import DEPTH, HALP_KINDS, allocate, present_kinds
from .importance import CRITERIA
from .prune import DEFAULT_CRITERION, KINDS, MODE, PruneSpec, kinds_of, model_macs_params, prune_
from .quantize import MODE as QUANTIZE, QuantConfig, quant_modules, quantize_
from .quantize.api import check_calibration_set
from .quantize.measured import measure_int8_layers_, resolve_runtime

__all__ = ["PruneConfig", "PruneStage", "QuantizeConfig", "QuantizeStage"]


@dataclass
class PruneConfig:
    """The ``prune`` stage: structured pruning of the newest model, by ratios per kind or by a
    budget of params, MACs or latency, optionally in steps with fine-tuning in between."""

    type: str = "prune"
    criterion: str = DEFAULT_CRITERION   # l1 | l2 | random | taylor | obd (effvision.compress.importance)
    ratio: float | None = None           # fraction removed from every kind the model has
    heads: float | None = None           # per kind (override ratio): attention heads
    mlp: float | None = None             # MLP hidden units
    width: float | None = None           # ViT embedding width
    channels: float | None = None        # conv/linear channels elsewhere
    budget: BudgetSpec | None = None     # instead of ratios: reach this fraction of dense
    budget_kinds: list[str] = field(default_factory=lambda: list(KINDS))  # what a budget may shrink (halp: + depth)
    max_ratio: float = 0.9               # a budget never removes more than this per kind
    round_to: int | None = None          # channel counts in multiples of this (8, 16)
    ignore: list[str] = field(default_factory=list)  # module names whose outputs keep their size
    steps: int = 1                       # iterative pruning
    recover_epochs: int = 0              # fine-tuning epochs between steps
    recover_lr: float = 5e-4
    calib_batches: int = 4               # taylor / obd: batches of the training data

    def validate(self, where: str) -> None:
        for kind in ("ratio", *KINDS):
            r = getattr(self, kind)
            if r is not None and not 0 < r < 1:
                raise ConfigError(f"{where}.{kind}: {r} is outside (0, 1)")
        has_ratio = any(getattr(self, k) is not None for k in ("ratio", *KINDS))
        if has_ratio == (self.budget is not None):
            raise ConfigError(f"{where}: give either ratios (ratio, heads, mlp, width, channels) or a budget")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"{where}.criterion: unknown '{self.criterion}' (available: {', '.join(CRITERIA)})")
        bad = [k for k in self.budget_kinds if k not in (*KINDS, DEPTH)]
        if bad or not self.budget_kinds:
            raise ConfigError(f"{where}.budget_kinds: {bad or 'empty'}; kinds are {', '.join(KINDS)} (and {DEPTH} with "
                              f"allocation halp)")
        if not 0 < self.max_ratio < 1:
            raise ConfigError(f"{where}.max_ratio: {self.max_ratio} is outside (0, 1)")
        if self.round_to is not None and self.round_to <= 0:
            raise ConfigError(f"{where}.round_to must be positive")
        if self.budget is not None and self.budget.allocation == "halp":
            other = [k for k in self.budget_kinds if k not in HALP_KINDS]
            if other:
                raise ConfigError(f"{where}.budget_kinds: allocation halp allocates {', '.join(HALP_KINDS)}, "
                                  f"not {', '.join(other)}; set budget_kinds within [{', '.join(HALP_KINDS)}]")
        elif DEPTH in self.budget_kinds:
            raise ConfigError(f"{where}.budget_kinds: {DEPTH} (whole blocks dropped) needs budget.allocation halp")
        if self.steps <= 0 or self.recover_epochs < 0 or self.calib_batches <= 0:
            raise ConfigError(f"{where}: steps and calib_batches must be positive, recover_epochs non-negative")

    def ratios(self) -> dict[str, float]:
        return {k: (getattr(self, k) if getattr(self, k) is not None else self.ratio or 0.0) for k in KINDS}

    def spec(self, ratios: dict[str, float]) -> PruneSpec:
        return PruneSpec(ratios=ratios, criterion=self.criterion, round_to=self.round_to, ignore=list(self.ignore),
                         steps=self.steps)


def _resolve_ratios(cfg: PruneConfig, model: nn.Module, example: torch.Tensor, tries: int = 7,
                    batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                    ) -> tuple[PruneSpec, dict[str, Any]]:
    """What to prune with (per-kind ratios, or for a budget the searched ratio or HALP's allocation), and
    what the search found; ``tries=0`` only checks that the budget is reachable at ``max_ratio``."""
    if cfg.budget is None:
        return cfg.spec(cfg.ratios()), {}
    present = present_kinds(model, cfg.budget_kinds)
    if not present:
        raise EffVisionError(f"prune.budget_kinds {cfg.budget_kinds}: {type(model).__name__} has none of them")
    if cfg.budget.allocation == "halp" and tries > 0:
        table = LatencyTable.for_search(model, example, present, cfg.budget, cfg.spec({}), cfg.max_ratio)
        reused = table.reused
        spec, found = allocate(model, example, present, cfg.budget, cfg.spec({}), batches, cfg.max_ratio, table)
        found.update(latency_table=str(table.path) if table.enabled else None, latency_table_reused=reused)
        return spec, found
    if DEPTH in present:  # preflight: dropping blocks reaches below any uniform ratio; allocate() says if it cannot
        return cfg.spec({}), {}
    table = None
    if cfg.budget.metric == "latency":  # halp's preflight checks reachability on the uniform table
        uniform = dataclasses.replace(cfg.budget, allocation="uniform")
        table = LatencyTable.for_search(model, example, present, uniform, cfg.spec({}))
    ratio, achieved = search_ratio(model, example, present, cfg.budget, cfg.spec({}), cfg.max_ratio, tries, table)
    found: dict[str, Any] = {"searched_ratio": ratio, "searched_fraction": achieved}
    if table is not None:
        found.update(latency_table=str(table.path) if table.enabled else None, latency_table_reused=table.reused,
                     latency_fractions=dict(sorted(table.entries.items())))
    return cfg.spec({k: ratio if k in present else 0.0 for k in KINDS}), found


def _widths(model: nn.Module) -> dict[str, int]:
    """Each attention's heads and each MLP's hidden units after pruning: what a budget allocated."""
    names = {id(m): n for n, m in model.named_modules()}
    kinds = kinds_of(model)
    return {**{names[id(a)]: a.num_heads for a in kinds["heads"]},
            **{names[id(f)]: f.out_features for f in kinds["mlp"]}}


class PruneStage(Stage):
    type = "prune"
    Config = PruneConfig
    mode = MODE

    @classmethod
    def preflight(cls, cfg: PruneConfig, recipe: Any, index: int) -> None:
        """Dry run on the recipe's (untrained) model: ignored names, coverage, budget reachability."""
        spec = recipe_spec(recipe)
        model = create_model(spec)
        example = torch.randn(2, spec.in_chans, spec.img_size, spec.img_size)
        if cfg.budget is not None:
            _resolve_ratios(cfg, model, example, tries=0)  # prunes a copy at max_ratio
            return
        dry = PruneSpec(ratios=cfg.ratios(), criterion="l1", round_to=cfg.round_to, ignore=list(cfg.ignore))
        prune_(model, dry, example)

    def run(self) -> dict[str, Any]:
        ctx, cfg, recipe = self.ctx, self.cfg, self.ctx.recipe
        t0 = time.perf_counter()
        model, spec = ctx.previous_model()
        loaders = ctx.loaders()
        calib = [(x.cpu(), y.cpu()) for x, y in islice(loaders.train.epoch(0), cfg.calib_batches)]
        example = calib[0][0][:2]
        dense = copy.deepcopy(model)
        pruning, search = _resolve_ratios(cfg, model, example, batches=calib)

        def recover(m: nn.Module, step: int) -> None:
            if cfg.recover_epochs:
                tc = TrainConfig(epochs=cfg.recover_epochs, optimizer=OptimizerConfig(lr=cfg.recover_lr),
                                 label_smoothing=0.0, eval_every=0)
                fit(m, tc, loaders, device=ctx.device, out_dir=ctx.stage_dir / f"recover-{step}",
                    num_classes=spec.num_classes, spec=spec, seed=recipe.seed, where=ctx.where)
                m.cpu()

        prune_(model, pruning, example, calib, between_steps=recover)
        ctx.save_model(model, spec)
        macs0, params0 = model_macs_params(dense, example[:1])
        macs1, params1 = model_macs_params(model, example[:1])
        report = {"criterion": cfg.criterion, "ratios": pruning.ratios, **search, "widths": _widths(model),
                  "dense": {"macs": macs0, "params": params0}, "pruned": {"macs": macs1, "params": params1},
                  "macs_fraction": macs1 / macs0, "params_fraction": params1 / params0}
        if cfg.budget is not None and cfg.budget.metric == "latency":
            # Measured again, round-robin, on the real criterion's model (the search used l1 copies).
            report["latency_fraction"] = latency_fraction(model, dense, example, cfg.budget)
        atomic_write_json(ctx.stage_dir / "prune.json", report)
        return {**report, "model": spec.name, "wall_time_s": time.perf_counter() - t0}


@dataclass
class QuantizeConfig(QuantConfig):
    """The ``quantize`` stage: post-training quantization calibrated on the training split (the
    quantization keys), with optional QAT fine-tuning."""

    type: str = "quantize"
    val_batches: int = 8           # training-split batches that judge the fallback (not the test split)
    qat_epochs: int = 0            # > 0: fine-tune the fake-quant model (straight-through estimator)
    qat_lr: float = 1e-4

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.qat_epochs < 0 or self.qat_lr <= 0 or self.val_batches < 1:
            raise ConfigError(f"{where}: qat_epochs >= 0, qat_lr > 0, val_batches >= 1")


class QuantizeStage(Stage):
    type = "quantize"
    Config = QuantizeConfig
    mode = QUANTIZE

    def run(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        t0 = time.perf_counter()
        loaders = ctx.loaders()
        batches = list(itertools.islice(loaders.train.epoch(0), cfg.calib_batches + cfg.val_batches))
        calib, val = batches[: cfg.calib_batches], batches[cfg.calib_batches:] or batches
        check_calibration_set(calib, cfg)  # before any work
        runtime = resolve_runtime(cfg) if cfg.int8_layers == "measured" else None
        model, spec = ctx.previous_model(on_device=True)
        model.eval()
        float_eval = evaluate(model, loaders.eval, ctx.device, "off")
        report = quantize_(model, library_config(cfg, QuantConfig), calib, val)
        ptq_eval = evaluate(model, loaders.eval, ctx.device, "off")
        summary: dict[str, Any] = {"float": float_eval, "ptq": ptq_eval, "report": report.to_dict()}
        if cfg.qat_epochs:
            model = self._qat(model, spec, loaders)
            summary["qat"] = evaluate(model, loaders.eval, ctx.device, "off")
        measured = None
        if runtime is not None:  # groups INT8 does not speed up in the runtime go back to float
            measured = measure_int8_layers_(model.cpu(), cfg, (spec.in_chans, spec.img_size, spec.img_size), runtime)
            summary["measured"] = evaluate(model.to(ctx.device), loaders.eval, ctx.device, "off")
        final = summary.get("measured", summary.get("qat", ptq_eval))
        ctx.save_model(model, spec)
        return {**summary, "top1": final["top1"], "top1_drop": float_eval["top1"] - final["top1"],
                "precision": cfg.precision, "target": cfg.target, "quantized_layers": len(quant_modules(model)),
                "fallback_layers": report.fallback, "model": spec.name,
                **({"int8_layers": measured} if measured else {}), "wall_time_s": time.perf_counter() - t0}

    def _qat(self, model, spec, loaders):
        train_cfg = TrainConfig(epochs=self.cfg.qat_epochs, optimizer=OptimizerConfig(name="adamw", lr=self.cfg.qat_lr,
                                                                                      weight_decay=0.0),
                                scheduler=SchedulerConfig(name="cosine"), label_smoothing=0.0, amp="off", eval_every=0)
        ctx = self.ctx
        return fit(model, train_cfg, loaders, device=ctx.device, out_dir=ctx.stage_dir / "qat",
                   num_classes=spec.num_classes, spec=spec, seed=ctx.recipe.seed, dist=ctx.dist,
                   augment=ctx.recipe.data.augment, resume=ctx.resume, where=ctx.where).model
