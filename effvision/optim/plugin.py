"""What effvision.optim provides: the optimizers galore_adamw, galore_adamw8bit and
galore_adafactor (in effvision.engine's optimizer registry) and the gpu_bench section ``galore``."""
from __future__ import annotations

from ..benchmarks.registry import Section, register_section
from . import factory  # noqa: F401  (registers the galore_* optimizers)

register_section("galore", Section("effvision.optim.gpu_section:galore_section",
                                   "effvision.optim.gpu_section:galore_markdown", priority=30, share=0.14, min_s=40,
                                   title="GaLore (vit_base_patch16_224, bf16 autocast; rank 128, T 200, scale 0.25)",
                                   requires=("triton",), recipes=("recipes/cifar10_vit_galore.yaml",),
                                   data=("cifar10",)))
