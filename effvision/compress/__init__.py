"""Model compression: structured pruning (Torch-Pruning + timm handlers), distillation, and
quantization (the ``quantize`` subpackage)."""
from .arch import apply_pruned, describe_pruned
from .distill import DistillLoss, DistillSpec, Distilled
from .importance import CRITERIA, Criterion, get_criterion, register_criterion
from .prune import KINDS, PruneSpec, kinds_of, prune_

__all__ = ["apply_pruned", "describe_pruned", "DistillLoss", "DistillSpec", "Distilled", "CRITERIA", "Criterion",
           "get_criterion", "register_criterion", "KINDS", "PruneSpec", "kinds_of", "prune_"]
