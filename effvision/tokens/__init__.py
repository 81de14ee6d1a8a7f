"""Token-level training efficiency: random layerwise token dropping (random-LTD)."""
from .config import TokenDropConfig
from .random_ltd import apply_token_drop, kept_tokens, remove_token_drop

__all__ = ["TokenDropConfig", "apply_token_drop", "kept_tokens", "remove_token_drop"]
