"""The training engine: trainer, checkpoints, evaluation, distributed helpers, hooks."""
from .checkpoint import Checkpointer, TrainPosition
from .config import SchedulerConfig, TrainConfig
from .distributed import DistInfo, init_distributed
from .evaluate import evaluate
from .hooks import Hooks
from .optim import OptimizerConfig, create_optimizer, register_optimizer
from .trainer import Trainer, TrainResult

__all__ = ["Checkpointer", "TrainPosition", "SchedulerConfig", "TrainConfig", "DistInfo", "init_distributed",
           "evaluate", "Hooks", "OptimizerConfig", "create_optimizer", "register_optimizer", "Trainer", "TrainResult"]
