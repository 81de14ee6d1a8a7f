"""The ``token_drop:`` block of a train or finetune stage."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["TokenDropConfig"]


@dataclass
class TokenDropConfig:
    start_tokens: int = 16                 # patch tokens each dropping block keeps at step 0
    schedule_steps: int = 0                # steps until all tokens are kept (0: half of the run)
    buckets: int = 4                       # distinct token counts (torch.compile: one graph each)
    layers: list[int] | None = None        # block indices that drop (default: all but first and last)
    layer_token_lr: bool = False           # the LR schedule follows consumed layer-tokens, not steps

    def validate(self, where: str) -> None:
        if self.start_tokens < 1:
            raise ConfigError(f"{where}.start_tokens must be at least 1")
        if self.schedule_steps < 0:
            raise ConfigError(f"{where}.schedule_steps must be non-negative")
        if not 1 <= self.buckets <= 16:
            raise ConfigError(f"{where}.buckets must be in [1, 16]")
