"""Curriculum learning and the batch ramp: a train or finetune stage's ``curriculum:`` and
``batch_ramp:`` blocks (a trainer extension, registered in ``plugin.py``)."""
from .curriculum import (BatchRampConfig, CurriculumConfig, CurriculumLoader, apply_curriculum, check_curriculum,
                         pacing, ramp_batch, resolutions)

__all__ = ["BatchRampConfig", "CurriculumConfig", "CurriculumLoader", "apply_curriculum", "check_curriculum",
           "pacing", "ramp_batch", "resolutions"]
