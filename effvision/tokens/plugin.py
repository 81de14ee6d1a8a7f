"""What effvision.tokens provides: the ``token_drop`` trainer extension (random-LTD) and the
gpu_bench section ``token_drop``."""
from __future__ import annotations

from ..benchmarks.registry import Section, register_section
from ..engine.extensions import TrainerExtension, register_extension
from .config import TokenDropConfig
from .random_ltd import preflight_token_drop, setup_token_drop

register_extension(TrainerExtension("token_drop", {"token_drop": TokenDropConfig}, setup_token_drop, order=20,
                                    preflight=preflight_token_drop))
register_section("token_drop", Section("effvision.tokens.gpu_section:token_drop_section",
                                       "effvision.tokens.gpu_section:token_drop_markdown", priority=35, share=0.12,
                                       min_s=120, title="random-LTD and curriculum on CIFAR-10 "
                                                        "(recipes/cifar10_vit_tiny.yaml; effvision.tokens, "
                                                        "effvision.curriculum)",
                                       recipes=("recipes/cifar10_vit_tiny.yaml",), data=("cifar10",)))
