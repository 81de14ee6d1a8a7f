"""effvision's models: small-image ViTs registered in timm, model save/load, the catalog."""
from . import small_vit  # noqa: F401  (registers models in timm on import)
from .io import ModelSpec, create_model, load_model, save_model
from .catalog import list_efficient_models, model_cost

__all__ = ["ModelSpec", "create_model", "load_model", "save_model", "list_efficient_models", "model_cost"]
