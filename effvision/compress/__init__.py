"""Model compression: pruning, distillation, quantization (each in its own subpackage)."""
