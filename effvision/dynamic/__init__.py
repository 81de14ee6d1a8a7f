"""Dynamic inference: token merging (ToMe) and token pruning (EViT) as the ``reduce_tokens`` mode
(persisted in the model's record, exported to ONNX with gathers, matmuls and top-k only); early
exit heads with a calibrated exit policy (``early_exit``); contextual sparsity
(``contextual_sparsity``): per-image attention heads and MLP neurons chosen by trained predictors."""
from .contextual import ContextualConfig, set_contextual_mode_
from .contextual_train import contextual_sparsity_
from .early_exit import ExitConfig, attach_exits_, run_early_exit
from .reduce import TokenReduceConfig, reduce_tokens_

__all__ = ["ContextualConfig", "contextual_sparsity_", "set_contextual_mode_", "ExitConfig", "attach_exits_",
           "run_early_exit", "TokenReduceConfig", "reduce_tokens_"]
