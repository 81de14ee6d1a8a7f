"""The CPU runtime race (``effvision deploy MODEL_DIR --target cpu``): every runtime and
precision installed here, checked against fp32 and timed side by side; the fastest ships."""
from .checks import Thresholds
from .contenders import REGISTRY
from .race import BASELINE, RaceConfig, run_race

__all__ = ["RaceConfig", "run_race", "Thresholds", "REGISTRY", "BASELINE"]
