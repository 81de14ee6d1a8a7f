"""Triton kernels, each beside its pure-PyTorch reference (imported as ``effvision.kernels``).

Kernels are chosen at run time on CUDA and never used for export, which goes through the
references.

- galore_adam: GaLore's fused Adam moment update (fp32 and block-wise 8-bit states).
- quant8: the block-wise 8-bit moment codes (references; the kernel path is fused above).
- block_sparse_attention: block-sparse flash attention (fwd+bwd) with an SDPA reference.
"""
