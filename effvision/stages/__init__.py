"""Recipe stages. The core ones live here (train, finetune, eval, export, bench); each technique
registers its own from its package's ``plugin.py`` (prune, quantize, reduce_tokens, ...), and
``stage_types()`` lists them all. The framework (Stage, StageContext, the registry) is
``effvision.engine.stage``."""
from ..engine.stage import MODEL_DIR, SUMMARY_FILE, Stage, StageContext, register_stage, stage_dirs, stage_types
from . import bench, evaluate, export, train  # noqa: F401  (registration of the core stages)
from .preflight import preflight

__all__ = ["MODEL_DIR", "SUMMARY_FILE", "Stage", "StageContext", "register_stage", "stage_dirs", "stage_types",
           "preflight"]
