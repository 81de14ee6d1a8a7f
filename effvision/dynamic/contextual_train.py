"""The contextual-sparsity verb ``contextual_sparsity_`` and the training of its predictors: the
oracle importance of every head and MLP neuron on calibration images (dense forward, ``collect``
mode), then per block a BCE fit of the predictor's scores to the oracle's top-k sets; and
predictor recall against the oracle."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import EffVisionError
from ..models.modes import add_mode, check_next, record_of
from .contextual import MODE, ContextualConfig, _shape, attach_predictors_, check_predictors_dir, set_contextual_mode_

__all__ = ["contextual_sparsity_", "collect_oracle", "train_predictors", "recall_at_k", "predictor_recall"]


@torch.no_grad()
def collect_oracle(model: nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per block: head_in (N, D), head_imp (N, H), mlp_in (N, D), mlp_imp (N, hidden) over all
    images, from the dense forward (the predictors' inputs and the oracle importance)."""
    was = model.training
    model.eval()
    for blk in model.blocks:
        blk._records = []
    set_contextual_mode_(model, "collect")
    try:
        for x in images:
            model(x)
    finally:
        set_contextual_mode_(model, "sparse")
        model.train(was)
    out = []
    for blk in model.blocks:
        recs, blk._records = blk._records, []
        out.append({k: torch.cat([r[k] for r in recs]).float() for k in recs[0]})
    return out


def recall_at_k(pred: torch.Tensor, oracle: torch.Tensor, k: int) -> torch.Tensor:
    """(N, M) scores -> (N,): the fraction of the oracle's top-k that the prediction's top-k holds."""
    p = torch.zeros_like(pred, dtype=torch.bool).scatter_(1, pred.topk(k, dim=1).indices, True)
    o = oracle.topk(k, dim=1).indices                                           # (N, k)
    return p.gather(1, o).float().mean(1)


def _fit(net: nn.Module, x: torch.Tensor, imp: torch.Tensor, k: int, cfg: ContextualConfig,
         gen: torch.Generator) -> float:
    """BCE of net(x) against the oracle's top-k labels; minibatches of 256. Returns the last loss."""
    labels = torch.zeros_like(imp).scatter_(1, imp.topk(k, dim=1).indices, 1.0)  # (N, M)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    loss = torch.zeros(())
    for _ in range(cfg.steps):
        sel = torch.randint(len(x), (min(256, len(x)),), generator=gen)
        loss = F.binary_cross_entropy_with_logits(net(x[sel]), labels[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return float(loss.detach())


def train_predictors(model: nn.Module, images: list[torch.Tensor], cfg: ContextualConfig, seed: int = 0
                     ) -> dict[str, Any]:
    """Fit every block's predictors to the oracle on ``images``; the report has per block the last
    loss and the recall on the calibration images (the stage measures it on the test split)."""
    data = collect_oracle(model, images)
    gen = torch.Generator().manual_seed(seed)
    report: list[dict[str, float]] = []
    for blk, d in tqdm(list(zip(model.blocks, data)), desc="predictors", unit="block"):
        pred = blk.ctx_pred
        dtype = next(pred.parameters()).dtype
        pred.float().train()
        with torch.enable_grad():
            lh = _fit(pred.heads, d["head_in"], d["head_imp"], blk.head_k, cfg, gen)
            lm = _fit(pred.neurons, d["mlp_in"], d["mlp_imp"], blk.mlp_k, cfg, gen)
        pred.eval().to(dtype)
        with torch.no_grad():
            rh = recall_at_k(pred.heads(d["head_in"].to(dtype)).float(), d["head_imp"], blk.head_k)
            rm = recall_at_k(pred.neurons(d["mlp_in"].to(dtype)).float(), d["mlp_imp"], blk.mlp_k)
        report.append({"loss_heads": lh, "loss_neurons": lm, "recall_heads": float(rh.mean()),
                       "recall_neurons": float(rm.mean())})
    return {"calib_images": len(data[0]["head_in"]), "blocks": report}


@torch.no_grad()
def predictor_recall(model: nn.Module, images: list[torch.Tensor]) -> list[dict[str, float]]:
    """Per block, the predictors' recall of the oracle's top-k sets on ``images`` (dense inputs)."""
    out = []
    for blk, d in zip(model.blocks, collect_oracle(model, images)):
        dtype = next(blk.ctx_pred.parameters()).dtype
        out.append({"heads": float(recall_at_k(blk.ctx_pred.heads(d["head_in"].to(dtype)).float(),
                                               d["head_imp"], blk.head_k).mean()),
                    "neurons": float(recall_at_k(blk.ctx_pred.neurons(d["mlp_in"].to(dtype)).float(),
                                                 d["mlp_imp"], blk.mlp_k).mean())})
    return out


def contextual_sparsity_(model: nn.Module, cfg: ContextualConfig, calib: list[torch.Tensor] | None = None
                         ) -> dict[str, Any]:
    """Attach predictors to ``model`` and train them on the calibration images ``calib`` (a list
    of (B, C, H, W) batches), or load them from ``cfg.predictors``. Leaves the model in mode
    ``sparse``; returns the training report (per-block loss and recall on ``calib``). The model's
    record gains a ``contextual_sparsity`` entry (the predictors' weights are model weights)."""
    cfg.validate()
    check_next(record_of(model), MODE)
    _shape(model)
    state = check_predictors_dir(model, cfg.predictors) if cfg.predictors else None  # checks before any change
    if state is None and not calib:
        raise EffVisionError("contextual_sparsity: calibration images are needed to train the predictors")
    if state is not None:
        cfg = ContextualConfig(**{**cfg.__dict__, "rank": state["blocks.0.ctx_pred.heads.0.weight"].shape[0]})
    attach_predictors_(model, cfg)
    if state is not None:
        for i, blk in enumerate(model.blocks):
            prefix = f"blocks.{i}.ctx_pred."
            blk.ctx_pred.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        report: dict[str, Any] = {"predictors": str(cfg.predictors)}
    else:
        report = train_predictors(model, calib, cfg)
    add_mode(model, MODE, cfg, {"rank": cfg.rank})
    return report
