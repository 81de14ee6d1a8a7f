"""effvision: efficient vision models over timm and PyTorch.

Importing effvision registers its small-image models in timm's registry.
"""
from . import _layout

_layout.install()  # effvision.export / effvision.kernels from a plain source checkout

from . import models  # noqa: E402,F401  (registers vit_*_patch4_32, convvit_*_32 in timm)
from .errors import ConfigError, EffVisionError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ConfigError", "EffVisionError", "__version__"]
