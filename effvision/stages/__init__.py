"""Recipe stages, registered by type. Later features add theirs with ``register_stage``."""
from .base import MODEL_DIR, STAGES, SUMMARY_FILE, Stage, StageContext, register_stage
from . import bench, evaluate, export, train  # noqa: F401,E402  (registration)
from . import finetune, prune  # noqa: F401,E402  (registration: effvision.compress)
from . import quantize  # noqa: F401,E402  (registration)
from . import contextual_sparsity, early_exit, reduce_tokens  # noqa: F401,E402  (registration: effvision.dynamic)

from . import assemble, grow  # noqa: F401,E402  (registration: effvision.assemble)

from . import sparse_attention  # noqa: F401,E402  (registration: effvision.attention)

__all__ = ["MODEL_DIR", "STAGES", "SUMMARY_FILE", "Stage", "StageContext", "register_stage"]
from . import detection  # noqa: F401,E402  (train_detection, eval_detection, export_detection)
