"""Memory-efficient optimizers: GaLore (gradient low-rank projection, Zhao et al. 2024).

Importing this package registers galore_adamw, galore_adamw8bit and galore_adafactor in
effvision.engine's optimizer registry.
"""
from .adafactor import GaLoreAdafactor
from .adamw import GaLoreAdamW, GaLoreAdamW8bit
from .base import GaLoreOptimizer
from .factory import build_galore, galore_param_groups, optimizer_state_bytes
from .select import VIT_TARGETS, split_params

__all__ = ["GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreOptimizer", "build_galore",
           "galore_param_groups", "optimizer_state_bytes", "VIT_TARGETS", "split_params"]
