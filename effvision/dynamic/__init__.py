"""Dynamic inference: token merging (ToMe) and token pruning (EViT) as model transforms that
persist in the model spec and export to ONNX with gathers, matmuls and top-k only; early exit
heads with a calibrated exit policy (``early_exit``); contextual sparsity (``contextual``):
per-image attention heads and MLP neurons chosen by trained predictors."""
from .contextual import ContextualConfig, contextual_sparsity_, set_contextual_mode_
from .early_exit import ExitConfig, attach_exits_, run_early_exit
from .reduce import TokenReduceConfig, reduce_tokens_

__all__ = ["ContextualConfig", "contextual_sparsity_", "set_contextual_mode_", "ExitConfig", "attach_exits_",
           "run_early_exit", "TokenReduceConfig", "reduce_tokens_"]
