"""Early exit for timm ViTs: classifier heads after chosen blocks, trained jointly with the
backbone, and an exit policy (softmax confidence or entropy) calibrated to an accuracy budget.

The model's own forward is unchanged (the final head), so export and the rest of effvision see
the plain timm model; ``exit_logits`` gives every head's output and ``run_early_exit`` stops at
the first head that is certain enough (batch 1, where stopping saves work).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, EffVisionError
from ..models.modes import add_mode, check_next, record_of, update_metadata

__all__ = ["ExitConfig", "MODE", "attach_exits_", "convert_exits", "set_exit_threshold_", "restore_exits", "exit_logits", "certainty",
           "calibrate_threshold", "run_early_exit", "ExitLoss"]

MODE = "early_exit"


@dataclass
class ExitConfig:
    after: list[int] = field(default_factory=lambda: [1])  # block indices (0-based) followed by an exit head
    weights: list[float] | None = None   # loss weight per exit head (default 1 each; the final head keeps 1)
    distill: float = 0.0                 # weight of KL(final head || exit head), the final head detached
    criterion: Literal["confidence", "entropy"] = "confidence"
    threshold: float | None = None       # exit when certainty >= threshold, in [0, 1]; None: calibrate
    accuracy_budget: float = 1.0         # calibration: largest top-1 drop (points) vs the full model
    calib_batches: int = 4               # batches of the training split the threshold is calibrated on

    def validate(self, where: str) -> None:
        if not self.after:
            raise ConfigError(f"{where}.after: name at least one block to exit after")
        if self.weights is not None and len(self.weights) != len(self.after):
            raise ConfigError(f"{where}.weights: {len(self.weights)} weights for {len(self.after)} exits")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"{where}.threshold: {self.threshold} is outside [0, 1]")
        if self.accuracy_budget < 0 or self.distill < 0 or self.calib_batches < 1:
            raise ConfigError(f"{where}: accuracy_budget and distill non-negative, calib_batches >= 1")


def _check(model: nn.Module, after: list[int], where: str = "exits.after") -> int:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not hasattr(model, "patch_embed") or not hasattr(model, "embed_dim"):
        raise EffVisionError(f"early exit needs a timm VisionTransformer-like model (blocks, patch_embed); "
                             f"{type(model).__name__} has no handler")
    depth = len(blocks)
    bad = [i for i in after if not 0 <= i < depth - 1]
    if bad or sorted(set(after)) != list(after):
        raise EffVisionError(f"{where}: {after} must be increasing block indices in [0, {depth - 2}] "
                             f"(the model has {depth} blocks; after the last one the final head decides)")
    return depth


class ExitHead(nn.Module):
    """Pool (the class token, else the mean patch token), LayerNorm, Linear."""

    def __init__(self, dim: int, num_classes: int, num_prefix: int, token_pool: bool) -> None:
        super().__init__()
        self.num_prefix, self.token_pool = num_prefix, token_pool
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, K)
        pooled = tokens[:, 0] if self.token_pool else tokens[:, self.num_prefix:].mean(1)
        return self.fc(self.norm(pooled))


def attach_exits_(model: nn.Module, exits: ExitConfig | list[int]) -> nn.Module:
    """Add ``model.exit_heads`` (one per block index in ``exits.after``) in place; the forward is
    unchanged. The model's record gains an ``early_exit`` entry (its threshold is set by
    ``set_exit_threshold_`` once calibrated)."""
    cfg = exits if isinstance(exits, ExitConfig) else ExitConfig(after=list(exits))
    check_next(record_of(model), MODE)
    _attach(model, list(cfg.after))
    model.exit_policy = (cfg.criterion, cfg.threshold)
    add_mode(model, MODE, cfg, {"threshold": cfg.threshold})
    return model


def convert_exits(model: nn.Module, cfg: ExitConfig, calib: list[torch.Tensor] | None) -> dict[str, Any]:
    """The ``early_exit`` mode's verb in the mode signature: the heads attached (untrained; the
    early_exit stage trains them and calibrates the threshold)."""
    attach_exits_(model, cfg)
    return {"exits_after": list(cfg.after)}


def set_exit_threshold_(model: nn.Module, threshold: float) -> None:
    """The calibrated exit threshold, on the model and in its record."""
    model.exit_policy = (model.exit_policy[0], threshold)
    update_metadata(model, MODE, threshold=threshold)


def _attach(model: nn.Module, after: list[int]) -> None:
    _check(model, after)
    token_pool = getattr(model, "global_pool", "token") == "token" and getattr(model, "cls_token", None) is not None
    ref = model.patch_embed.proj.weight
    model.exit_heads = nn.ModuleList(
        ExitHead(model.embed_dim, model.num_classes, model.num_prefix_tokens, token_pool) for _ in after
    ).to(device=ref.device, dtype=ref.dtype)
    model.exit_after = list(after)


def restore_exits(model: nn.Module, config: dict[str, Any], metadata: dict[str, Any]) -> None:
    """The ``early_exit`` mode's restore: the heads (their weights load next) and the exit policy."""
    _attach(model, list(config["after"]))
    model.exit_policy = (config.get("criterion", "confidence"), metadata.get("threshold"))


def legacy_exit(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A model spec's pre-record ``early_exit`` transform -> (config, metadata)."""
    return ({"after": list(params["after"]), "criterion": params.get("criterion", "confidence")},
            {"threshold": params.get("threshold")})


def _embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)  # (B, N, D)


def exit_logits(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every exit head's logits, then the final head's: a list of (B, K), len(after) + 1."""
    heads = dict(zip(model.exit_after, model.exit_heads))
    tokens, out = _embed(model, x), []
    for i, block in enumerate(model.blocks):
        tokens = block(tokens)
        if i in heads:
            out.append(heads[i](tokens))
    out.append(model.forward_head(model.norm(tokens)))
    return out


def certainty(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """(B, K) -> (B,) in [0, 1]: the top softmax probability, or 1 - entropy / log K."""
    p = logits.float().softmax(-1)
    if criterion == "confidence":
        return p.max(-1).values
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return 1.0 - entropy / math.log(p.shape[-1])


def _simulate(certs: torch.Tensor, preds: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """certs, preds: (E+1, N), the last row the final head. -> (prediction, exit index) per sample."""
    take = certs >= threshold
    take[-1] = True  # the final head always answers
    first = take.float().argmax(0)  # (N,) the first head certain enough
    return preds.gather(0, first[None])[0], first


@torch.no_grad()
def calibrate_threshold(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], criterion: str,
                        budget: float) -> dict[str, Any]:
    """The lowest threshold (most exits) whose top-1 stays within ``budget`` points of the full
    model on ``batches``; with the fraction of blocks it executes there."""
    was = model.training
    model.eval()
    outs = [exit_logits(model, x) for x, _ in batches]
    model.train(was)
    labels = torch.cat([y for _, y in batches])
    logits = [torch.cat([o[e] for o in outs]) for e in range(len(outs[0]))]
    certs = torch.stack([certainty(z, criterion) for z in logits])  # (E+1, N)
    preds = torch.stack([z.argmax(-1) for z in logits])              # (E+1, N)
    full = 100.0 * float((preds[-1] == labels).float().mean())
    best = {"threshold": 1.0, "top1": full}
    # Candidates: the observed certainties (the only places the decision changes), highest first.
    for t in torch.unique(certs[:-1]).flip(0).tolist()[:2000]:
        pred, _ = _simulate(certs, preds, t)
        acc = 100.0 * float((pred == labels).float().mean())
        if acc >= full - budget:
            best = {"threshold": float(t), "top1": acc}
        else:
            break  # lower thresholds exit more: stop at the first that breaks the budget
    _, first = _simulate(certs, preds, best["threshold"])
    return {**best, "full_top1": full, "blocks_fraction": blocks_fraction(model, first), "samples": len(labels)}


def blocks_fraction(model: nn.Module, exit_index: torch.Tensor) -> float:
    """Mean fraction of the blocks run when samples leave at ``exit_index`` (len(after) = final)."""
    depth = len(model.blocks)
    run = torch.tensor([i + 1 for i in model.exit_after] + [depth], dtype=torch.float32)
    return float(run[exit_index].mean() / depth)


@torch.no_grad()
def run_early_exit(model: nn.Module, x: torch.Tensor, threshold: float, criterion: str = "confidence"
                   ) -> tuple[torch.Tensor, int]:
    """Batch 1: run blocks until an exit head is certain enough. -> (logits (1, K), blocks run)."""
    if x.shape[0] != 1:
        raise EffVisionError(f"run_early_exit stops per image: batch 1, got {x.shape[0]}")
    heads = dict(zip(model.exit_after, model.exit_heads))
    tokens = _embed(model, x)
    for i, block in enumerate(model.blocks):
        tokens = block(tokens)
        if i in heads:
            logits = heads[i](tokens)
            if float(certainty(logits, criterion)[0]) >= threshold:
                return logits, i + 1
    return model.forward_head(model.norm(tokens)), len(model.blocks)


class ExitLoss:
    """A trainer ``LossTerm``: each exit head's cross-entropy on the labels (weighted), plus
    optionally KL from the final head; block outputs are captured by forward hooks during the
    trainer's own forward, so the backbone runs once."""

    def __init__(self, model: nn.Module, cfg: ExitConfig) -> None:
        self.cfg = cfg
        self.weights = cfg.weights or [1.0] * len(cfg.after)
        self._captured: dict[int, torch.Tensor] = {}
        for i in cfg.after:
            model.blocks[i].register_forward_hook(self._capture(i))

    def _capture(self, index: int):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if module.training:  # evaluation and export run without keeping activations
                self._captured[index] = output
        return hook

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
        base = model.student if hasattr(model, "student") else model
        terms: dict[str, torch.Tensor] = {}
        target = logits.detach().float().softmax(-1)
        for i, head, w in zip(self.cfg.after, base.exit_heads, self.weights):
            z = head(self._captured.pop(i))  # (B, K)
            loss = w * F.cross_entropy(z, y)
            if self.cfg.distill > 0:
                loss = loss + self.cfg.distill * F.kl_div(z.float().log_softmax(-1), target, reduction="batchmean")
            terms[f"exit{i}"] = loss
        return terms
