"""A compact training loop over timm's optimizer/scheduler factories, with hooks.

Read it top to bottom: ``fit`` runs epochs of ``_train_step`` and writes metrics,
checkpoints and the final model. Resumption restores weights, optimizer, scheduler, RNG
and the data position; the data order and augmentation are functions of (seed, epoch,
step), so a resumed CPU run ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..data.build import Loaders
from ..data.config import AugmentConfig
from ..data.tensor_loader import step_seed
from ..errors import EffVisionError, TrainingDiverged
from ..io import append_jsonl, atomic_write_text
from .checkpoint import Checkpointer, TrainPosition
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_mean, any_rank, barrier, broadcast_object
from .evaluate import autocast, evaluate
from .fsdp import Sharded, local_values
from .hooks import Hooks
from .loggers import RunLogger
from .optim import create_optimizer
from .preemption import Preempted, stop_on_signals, stop_requested

__all__ = ["Trainer", "TrainResult"]


@dataclass
class TrainResult:
    model: nn.Module            # the weights to keep (EMA if configured), unwrapped
    metrics: dict[str, Any]     # last evaluation and throughput
    train_time_s: float


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, loaders: Loaders, *, device: torch.device,
                 out_dir: Path, num_classes: int, seed: int = 0, dist: DistInfo | None = None,
                 augment: AugmentConfig | None = None, hooks: Hooks | None = None, progress: bool = True,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        self.cfg, self.loaders, self.device = cfg, loaders, device
        self.out_dir, self.seed = Path(out_dir), seed
        self.dist = dist or DistInfo()
        self.hooks = hooks or Hooks()
        self.progress = progress and self.dist.is_main
        self.steps_per_epoch = len(loaders.train)
        if self.steps_per_epoch == 0:
            raise EffVisionError(f"the training set is smaller than one batch ({loaders.train.batch_size}); "
                                 f"lower data.batch_size")
        self.total_steps = cfg.epochs * self.steps_per_epoch  # with budget_s: an upper bound
        # The budget clock (injectable for tests): seconds of training steps, evaluation and
        # checkpoints excluded; budget_s keys the LR schedule to it and stops training at it.
        self.timer = timer
        self.budget_used = self.eval_time = self.checkpoint_time = 0.0
        if cfg.budget_s is not None:  # the features' schedules (tokens, curriculum) run on the budget clock too
            self.hooks.budget_position = lambda _step: min(self.budget_used / cfg.budget_s, 1.0) * self.total_steps

        self.model = model.to(device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        # FSDP2 shards the parameters in place, so before the optimizer sees them.
        self.sharded = Sharded(self.model) if self.dist.enabled and cfg.distributed == "fsdp" else None
        self.optimizer = create_optimizer(self.model, cfg.optimizer)
        # Per-layer optimizers (GaLore layerwise) step each parameter inside backward.
        self.layerwise = bool(getattr(self.optimizer, "layerwise", False))
        if self.layerwise and self.dist.enabled:
            raise EffVisionError("optimizer.layerwise steps each parameter as soon as its local gradient exists, "
                                 "before DDP has averaged it across processes (every rank would drift apart); "
                                 "set layerwise: false under torchrun")
        self.scheduler = self._create_scheduler()
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema_decay else None
        self.amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "off")
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == "fp16" else None

        self.mixup = None
        if augment is not None and (augment.mixup > 0 or augment.cutmix > 0):
            self.mixup = Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix, prob=augment.mix_prob,
                               label_smoothing=cfg.label_smoothing, num_classes=num_classes)
        if self.mixup is not None:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

        # The module the loop calls: DDP, then torch.compile, around the plain model.
        self.train_module: nn.Module = self.model
        self.ddp: DistributedDataParallel | None = None
        if self.dist.enabled and self.sharded is None:
            self.ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
            self.train_module = self.ddp
        if cfg.compile:
            self.train_module = torch.compile(self.train_module)
        self.train_time, self.images_seen = 0.0, 0  # completed epochs, carried across resumes
        self.epoch_images = 0  # images trained on in the current epoch's steps
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints")
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.logger: RunLogger | None = None
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._epoch_loss = (0.0, 0)  # (sum of window mean losses x steps, steps) of the current epoch

    def _create_scheduler(self) -> Any:
        s = self.cfg.scheduler
        if s.name == "onecycle":
            # Rise from warmup_lr to lr, anneal to min_lr; momentum/betas stay the recipe's own.
            lr = self.cfg.optimizer.lr
            start = min(max(s.warmup_lr, 1e-12), lr)
            return torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer, max_lr=lr, total_steps=self.total_steps + 1,
                pct_start=max(s.warmup_epochs / self.cfg.epochs, 1e-3), cycle_momentum=False,
                div_factor=lr / start, final_div_factor=start / max(s.min_lr, start * 1e-4))
        if s.name == "constant":
            return None
        sched, _ = create_scheduler_v2(self.optimizer, sched=s.name, num_epochs=self.cfg.epochs,
                                       warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr, min_lr=s.min_lr,
                                       decay_epochs=s.decay_epochs, decay_rate=s.decay_rate,
                                       step_on_epochs=False, updates_per_epoch=self.steps_per_epoch)
        return sched

    # ---- checkpoints -----------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        optimizer = self.sharded.optimizer_state(self.optimizer) if self.sharded else self.optimizer.state_dict()
        state: dict[str, Any] = {"optimizer": optimizer, "rng": torch.get_rng_state(),
                                 "progress": {"train_time_s": self.train_time, "images_seen": self.images_seen,
                                              "budget_used_s": self.budget_used}}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def _save(self, pos: TrainPosition) -> None:
        # A finite loss can still leave non-finite weights (an inf gradient): never save those.
        finite = torch.stack([local_values(p).detach().isfinite().all() for p in self.model.parameters()]).all()
        if self.sharded is not None:  # every rank holds a shard: all must be finite
            finite = all_reduce_mean(finite.float()) == 1
        if not bool(finite):
            raise TrainingDiverged(f"weights are not finite after update {pos.global_step}; the last good checkpoint "
                                   f"is kept in {self.checkpointer.dir} (lower the learning rate)")
        # Under FSDP gathering the full weights and optimizer state is collective: every rank.
        weights = self.sharded.model_state() if self.sharded else self.model
        state = self._state() if self.sharded or self.dist.is_main else {}
        if self.dist.is_main:
            self.checkpointer.save(weights, self.ema.module if self.ema else None, state, pos)
        barrier()

    def _restore(self) -> TrainPosition:
        path = self.checkpointer.latest()
        if path is None:
            return TrainPosition()
        if self.sharded is not None:  # every rank reads the full checkpoint and keeps its shards
            state, pos = self.checkpointer.load(path, None, None, self.device)
        else:
            state, pos = self.checkpointer.load(path, self.model, self.ema.module if self.ema else None, self.device)
        try:  # the optimizer, schedule and RNG states of another run, or damaged ones, do not fit this one
            if self.sharded is not None:
                self.sharded.load(self.checkpointer.weights(path), self.optimizer, state["optimizer"])
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and "scheduler" in state:
                self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"].cpu())
            if "cuda_rng" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
            progress = state.get("progress", {})
            self.train_time = float(progress.get("train_time_s", 0.0))
            self.images_seen = int(progress.get("images_seen", 0))
            self.budget_used = float(progress.get("budget_used_s", 0.0))
        except (LookupError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise EffVisionError(f"checkpoint {path} does not fit this run: {type(e).__name__}: {e}") from e
        if self.dist.is_main:
            self._truncate_metrics(pos)
        return pos

    def _truncate_metrics(self, pos: TrainPosition) -> None:
        """Drop metrics.jsonl records written after the checkpoint: they are about to be redone."""
        if not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # half a line (a kill mid-append) or damage: the record is redone or lost
            if not isinstance(r, dict):
                continue
            step, epoch = r.get("global_step", -1), r.get("epoch")
            if isinstance(step, int) and step <= pos.global_step and \
                    (not r.get("eval") or (isinstance(epoch, int) and epoch < pos.epoch)):
                keep.append(line)
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in keep))

    # ---- the loop ----------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainResult:
        """Train to the end (or the budget). On SIGTERM/SIGUSR1: checkpoint after the current
        step and raise ``Preempted`` (engine/preemption.py)."""
        with stop_on_signals():
            return self._fit(resume)

    def _fit(self, resume: bool) -> TrainResult:
        pos = self._restore() if resume else TrainPosition()
        if self.dist.is_main:  # after the checkpoint is read: a resume that fails has written nothing
            self.logger = RunLogger(self.cfg.log, self.out_dir, run_name=f"{self.out_dir.parent.name}/{self.out_dir.name}")
            if resume:
                self.logger.truncate(pos.global_step)
        if pos.global_step and self.dist.is_main:
            print(f"resuming at epoch {pos.epoch}, step {pos.step} ({pos.global_step}/{self.total_steps} updates)")
        self.train_module.train()
        # In a log file (no TTY) a redraw is a new line: redraw rarely there.
        # Under budget_s the bar counts budget seconds (epochs is only an upper bound there, whose
        # step count would put the ETA hours out); its postfix still shows img/s.
        budget = self.cfg.budget_s
        bar = tqdm(total=self.total_steps if budget is None else budget,
                   initial=pos.global_step if budget is None else min(self.budget_used, budget),
                   disable=not self.progress, unit="step" if budget is None else "s", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 15.0,
                   bar_format=None if budget is None else "{l_bar}{bar}| {n:.0f}/{total:.0f} s of budget "
                                                          "[{elapsed}<{remaining}{postfix}]")
        metrics: dict[str, Any] = {}
        try:
            for epoch in range(pos.epoch, self.cfg.epochs):
                if self.budget_spent():  # resumed after the budget ran out
                    break
                start_step = pos.step if epoch == pos.epoch else 0
                t0 = time.perf_counter()
                pos = self._train_epoch(epoch, start_step, pos, bar)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                epoch_time = time.perf_counter() - t0
                self.train_time += epoch_time
                self.images_seen += self.epoch_images  # this attempt's steps of the epoch (batch_ramp: smaller)
                last = epoch + 1 == self.cfg.epochs or self.budget_spent()
                if pos.step == self.steps_per_epoch:  # else the budget stopped it mid-epoch
                    pos = TrainPosition(epoch + 1, 0, pos.global_step)
                t_eval = self.timer()
                if last or (self.cfg.eval_every and (epoch + 1) % self.cfg.eval_every == 0):
                    # train_time_s: the training clock so far (accuracy-vs-time curves with eval_every > 1)
                    metrics = {**self._evaluate(), "epoch": epoch, "epoch_time_s": epoch_time,
                               "train_time_s": self.train_time}
                    if self.dist.is_main:
                        append_jsonl(self.metrics_path, {"eval": True, **metrics})
                        loss_sum, loss_steps = self._epoch_loss
                        self.logger.evaluation(metrics, pos.global_step, loss_sum / loss_steps if loss_steps else None,
                                               self.optimizer.param_groups[0]["lr"])
                        bar.write(f"epoch {epoch}: top1 {metrics['top1']:.2f}%  loss {metrics['loss']:.4f}  "
                                  f"({epoch_time:.1f} s)")
                    for cb in self.hooks.on_epoch_end:
                        cb(epoch, metrics)
                t_save = self.timer()
                self.eval_time += t_save - t_eval
                self._save(pos)
                self.checkpoint_time += self.timer() - t_save
                if last:
                    break
                self._stop_if_requested(pos, saved=True)
        finally:
            bar.close()  # before any error message, so the message gets its own line
            if self.logger is not None:
                self.logger.close()
        if not metrics:  # resumed from the final checkpoint: nothing left to train, still evaluate
            metrics = {**self._evaluate(), "epoch": self.cfg.epochs - 1}
        # Across resumes: the time and images of every attempt's completed epochs.
        metrics["train_time_s"] = self.train_time
        metrics["train_img_per_s"] = self.images_seen / self.train_time if self.train_time else 0.0
        if self.cfg.budget_s is not None:
            metrics.update(budget_s=self.cfg.budget_s, budget_used_s=self.budget_used, steps_done=pos.global_step,
                           eval_time_s=self.eval_time, checkpoint_time_s=self.checkpoint_time)
        final = self.ema.module if self.ema is not None else self.model
        if self.sharded is not None:
            weights = self.sharded.model_state()  # collective; full on rank 0
            if self.dist.is_main:
                final = self.sharded.unsharded(weights)
        return TrainResult(final, metrics, self.train_time)

    def _train_epoch(self, epoch: int, start_step: int, pos: TrainPosition, bar: tqdm) -> TrainPosition:
        """Steps ``start_step``.. of one epoch, logging every ``log_every`` steps; returns the position."""
        loss_sum = torch.zeros((), device=self.device)
        self._epoch_loss = (0.0, 0)
        window_start, window_images, window_steps = time.perf_counter(), 0, 0
        tick = self.timer()
        self.epoch_images = 0
        for step, (x, y) in enumerate(self.loaders.train.epoch(epoch, start_step), start=start_step):
            loss = self._train_step(x, y, epoch, step, pos.global_step)
            if self.cfg.budget_s is not None:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # the clock must see the step's work
                now = self.timer()
                # Every rank stops at the same step: rank 0's clock decides.
                spent = float(broadcast_object(now - tick))
                self.budget_used += spent
                tick = now
            loss_sum += loss.detach()
            pos = TrainPosition(epoch, step + 1, pos.global_step + 1)
            window_images += len(y) * self.dist.world_size
            self.epoch_images += len(y) * self.dist.world_size
            window_steps += 1
            bar.update(1 if self.cfg.budget_s is None else min(spent, bar.total - bar.n))  # last step overshoots
            if pos.global_step % self.cfg.log_every == 0 or step + 1 == self.steps_per_epoch:
                # One host sync per window: the NaN check and the logged loss share it.
                mean_loss = float(all_reduce_mean(loss_sum)) / window_steps
                self._check_finite(mean_loss, f"epoch {epoch}, step {step}")
                rate = window_images / max(time.perf_counter() - window_start, 1e-9)
                lr = self.optimizer.param_groups[0]["lr"]
                bar.set_postfix(epoch=epoch, loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
                self._epoch_loss = (self._epoch_loss[0] + mean_loss * window_steps, self._epoch_loss[1] + window_steps)
                if self.dist.is_main:
                    record = {"epoch": epoch, "step": step, "global_step": pos.global_step,
                              "loss": mean_loss, "lr": lr, "img_per_s": rate}
                    append_jsonl(self.metrics_path, record)
                    self.logger.step(record)
                loss_sum.zero_()
                window_start, window_images, window_steps = time.perf_counter(), 0, 0
            saved = False
            if self.cfg.checkpoint_every and pos.global_step % self.cfg.checkpoint_every == 0 \
                    and step + 1 < self.steps_per_epoch:
                self._check_finite(float(all_reduce_mean(loss_sum)), f"before step {pos.global_step}'s checkpoint")
                self._save(pos)
                saved = True
                tick = self.timer()  # checkpoints are off the budget clock
            if step + 1 < self.steps_per_epoch:  # at an epoch's end, fit saves and checks after it
                self._stop_if_requested(pos, saved)
            if self.budget_spent():
                if window_steps:
                    self._check_finite(float(all_reduce_mean(loss_sum)) / window_steps, f"epoch {epoch}, step {step}")
                break
        return pos

    def _stop_if_requested(self, pos: TrainPosition, saved: bool) -> None:
        """Checkpoint at ``pos`` and raise ``Preempted`` if a stop signal reached any rank (all
        ranks decide together, after the same step)."""
        if not any_rank(stop_requested() is not None, self.device):
            return
        if not saved:
            self._save(pos)
        raise Preempted(f"stopped by {stop_requested() or 'a stop signal on another rank'} after update "
                        f"{pos.global_step}/{self.total_steps} (epoch {pos.epoch}, step {pos.step}); "
                        f"the checkpoint is in {self.checkpointer.dir}: rerun with --resume to continue")

    def _check_finite(self, loss: float, where: str) -> None:
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss is {loss} at {where}; the last good checkpoint is kept in "
                                   f"{self.checkpointer.dir} (lower the learning rate, or add grad_clip)")

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int, global_step: int) -> torch.Tensor:
        for hook in self.hooks.before_step:
            hook(self.model, global_step, self.total_steps)
        if self.scheduler is not None and not isinstance(self.scheduler, torch.optim.lr_scheduler.OneCycleLR):
            self.scheduler.step_update(self.schedule_position(global_step))
        target = y
        if self.mixup is not None:
            np.random.seed(step_seed(self.seed, epoch, step) % 2**32)  # timm's Mixup draws from numpy's global RNG
            x, target = self.mixup(x, y)
        n_micro = min(self.cfg.grad_accum_steps, len(x))
        total = x.new_zeros((), dtype=torch.float32)
        # Gradient accumulation: the batch in micro-batches, each loss weighted by its share,
        # so the summed gradient is the full batch's (same update, 1/n of the activations).
        for i, (xm, ym, tm) in enumerate(zip(x.tensor_split(n_micro), y.tensor_split(n_micro),
                                             target.tensor_split(n_micro))):
            last = i + 1 == n_micro
            with self._maybe_no_sync(last):
                with autocast(self.device, self.amp):
                    logits = self.train_module(xm)  # (b, K)
                    loss = self.criterion(logits, tm)
                    for term in self.hooks.loss_terms:
                        for value in term(self.model, xm, ym, logits).values():
                            loss = loss + value
                    loss = loss * (len(xm) / len(x))
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            total += loss.detach().float()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if self.layerwise:
            # Every parameter was stepped and its gradient freed during backward; this step()
            # finds no gradient left (so updates nothing) and keeps LR schedulers' bookkeeping.
            self.optimizer.step()
        elif self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if not self.layerwise:
            self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.OneCycleLR):
            # OneCycleLR steps after the update to the next step's position.
            self.scheduler.last_epoch = self.schedule_position(global_step + 1) - 1
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, step=global_step)
        for hook in self.hooks.after_step:
            hook(self.model, global_step, self.total_steps)
        return total

    def _maybe_no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients only in the last micro-batch's backward."""
        if self.ddp is None or last_micro_batch:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def schedule_position(self, global_step: int) -> float | int:
        """The one schedule clock: what the LR schedule sees, in [0, total_steps]. Steps by
        default; the fraction of budget_s spent; or the hooks' clock (layer-tokens consumed)."""
        if self.hooks.budget_position is not None:
            return self.hooks.budget_position(global_step)
        if self.hooks.schedule_clock is not None:
            return self.hooks.schedule_clock(global_step, self.total_steps)
        return global_step

    def budget_spent(self) -> bool:
        return self.cfg.budget_s is not None and self.budget_used >= self.cfg.budget_s

    def _evaluate(self) -> dict[str, Any]:
        """Rank 0 evaluates (under FSDP every rank runs the forward passes: each holds a shard);
        every rank gets the metrics (hooks on all ranks may read them)."""
        out: dict[str, Any] = {}
        if self.dist.is_main or self.sharded is not None:
            model = self.ema.module if self.ema is not None else self.model
            out = evaluate(model, self.loaders.eval, self.device, self.amp, self.cfg.eval_tta_flip)
        return broadcast_object(out)
