"""Dynamic inference: token merging (ToMe) and token pruning (EViT) as model transforms that
persist in the model spec and export to ONNX with gathers, matmuls and top-k only."""
from .reduce import TokenReduceConfig, reduce_tokens_

__all__ = ["TokenReduceConfig", "reduce_tokens_"]
