"""Triton kernels, each beside its pure-PyTorch reference (imported as ``effvision.kernels``).

Kernels are chosen at run time on CUDA and never used for export, which goes through the
references. The GaLore and sparse-attention kernels arrive with their issues.
"""
