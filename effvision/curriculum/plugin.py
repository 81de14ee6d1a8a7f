"""What effvision.curriculum provides: the ``curriculum`` and ``batch_ramp`` trainer extension."""
from __future__ import annotations

from ..engine.extensions import TrainerExtension, register_extension
from .curriculum import BatchRampConfig, CurriculumConfig, preflight_curriculum, setup_curriculum

register_extension(TrainerExtension("curriculum", {"curriculum": CurriculumConfig, "batch_ramp": BatchRampConfig},
                                    setup_curriculum, order=30, preflight=preflight_curriculum))
