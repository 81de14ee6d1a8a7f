"""The training configuration (what the Trainer reads; training stages add their extensions' keys)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError
from .loggers import LogConfig
from .optim import OptimizerConfig

__all__ = ["SchedulerConfig", "TrainConfig"]


@dataclass
class SchedulerConfig:
    """The learning-rate schedule of a training stage: a timm scheduler with optional linear warm-up,
    PyTorch's OneCycleLR, or a constant rate."""

    name: Literal["cosine", "onecycle", "step", "poly", "tanh", "constant"] = "cosine"
    warmup_epochs: float = 0.0     # linear warm-up (timm schedulers; onecycle: its rise phase)
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    decay_epochs: float = 30.0     # step only
    decay_rate: float = 0.1


@dataclass
class TrainConfig:
    """The ``train`` and ``finetune`` stages: epochs, optimizer, schedule, precision, evaluation,
    checkpointing and logging of effvision's trainer. Those stages add one optional key per
    trainer extension; the other training stages (meta, incubate, early_exit) extend this config."""

    type: str = "train"
    epochs: int = 10
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    label_smoothing: float = 0.1
    grad_clip: float | None = None         # max global grad norm
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA, off on CPU
    channels_last: bool = False
    compile: bool = False                  # torch.compile the model
    grad_checkpointing: bool = False       # timm's set_grad_checkpointing
    ema_decay: float | None = None         # timm ModelEmaV3; the EMA weights are evaluated and saved
    eval_every: int = 1                    # epochs between evaluations (0: only at the end)
    eval_tta_flip: bool = False            # average logits over the image and its mirror
    checkpoint_every: int = 0              # steps between checkpoints (0: at each epoch end)
    log_every: int = 20                    # steps between metrics.jsonl records (and NaN checks)
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP2 fully_shard)
    grad_accum_steps: int = 1              # split each batch into this many micro-batches (same updates, less memory)
    log: LogConfig = field(default_factory=LogConfig)  # TensorBoard / CSV / W&B beside metrics.jsonl
    budget_s: float | None = None          # train for this many seconds of training time (LR keyed to the clock)
    # The train and finetune stages add one key per trainer extension (engine.extensions): token_drop,
    # curriculum, batch_ramp, keep_schedule, distill, qat.

    def validate(self, where: str) -> None:
        if self.epochs <= 0:
            raise ConfigError(f"{where}.epochs must be positive")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"{where}.label_smoothing must be in [0, 1)")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"{where}.ema_decay must be in (0, 1)")
        warm = self.scheduler.warmup_epochs
        if warm < 0 or warm > self.epochs or (self.scheduler.name == "onecycle" and warm >= self.epochs):
            raise ConfigError(f"{where}.scheduler.warmup_epochs must be within [0, epochs] (below epochs for onecycle)")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"{where}.grad_clip must be positive")
        if self.optimizer.layerwise and self.grad_clip:
            raise ConfigError(f"{where}: optimizer.layerwise steps each parameter during backward, before a global "
                              f"gradient norm exists; grad_clip cannot be combined with it")
        if self.optimizer.layerwise and self.amp == "fp16":
            raise ConfigError(f"{where}: optimizer.layerwise cannot use amp fp16 (the loss scaler must see every "
                              f"gradient before any step); use amp bf16")
        if self.log_every <= 0 or self.checkpoint_every < 0 or self.eval_every < 0:
            raise ConfigError(f"{where}: log_every must be positive; checkpoint_every, eval_every non-negative")
        if self.distributed == "fsdp" and self.ema_decay:
            raise ConfigError(f"{where}: ema_decay keeps a full copy of the model on every process, which "
                              f"distributed: fsdp exists to avoid; drop one of them")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"{where}.grad_accum_steps must be at least 1")
        if self.grad_accum_steps > 1 and self.optimizer.layerwise:
            raise ConfigError(f"{where}: optimizer.layerwise steps each parameter during backward, so gradients "
                              f"cannot accumulate over micro-batches; set grad_accum_steps: 1")
        self.log.validate(f"{where}.log")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ConfigError(f"{where}.budget_s must be positive (seconds of training time)")
