"""effvision: efficient vision models over timm and PyTorch.

Importing effvision registers its small-image models in timm's registry.
"""
from . import _layout

_layout.install()  # effvision.export / effvision.kernels from a plain source checkout

from . import models  # noqa: E402,F401  (registers vit_*_patch4_32, convvit_*_32 in timm)
from .errors import ConfigError, EffVisionError  # noqa: E402

__version__ = "0.1.0"
# The notebook API (effvision.api), imported on first use: `import effvision` stays light.
# (export_model, not export: effvision.export is the export package.)
_API = ("prune", "train", "distill", "quantize", "save", "load", "export_model", "spec_of", "PruneSpec", "QuantConfig")
__all__ = ["ConfigError", "EffVisionError", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'effvision' has no attribute '{name}'")
