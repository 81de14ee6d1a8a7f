"""Modular training: function-preserving growth of timm ViTs (depth, width x2)."""
from .grow import GrowConfig, grow_model

__all__ = ["GrowConfig", "grow_model"]
