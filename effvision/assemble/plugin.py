"""What effvision.assemble provides: the ``grow`` mode, the modular-training stages (``grow``,
``meta``, ``incubate``, ``assemble``), the carried optimizer state of a grown model (a trainer
extension) and the gpu_bench section ``assemble``."""
from __future__ import annotations

from ..benchmarks.registry import Section, register_section
from ..engine.extensions import TrainerExtension, register_extension
from ..engine.stage import register_stage
from ..models.modes import Mode, register_mode
from .grow import MODE, GrowConfig, restore_grown
from .optimizer_state import started_carry
from .stages import AssembleStage, GrowStage, IncubateStage, MetaStage

register_mode(Mode(MODE, version=1, restore=restore_grown, config=GrowConfig, only_after=(MODE,),
                   why="grow rebuilds the timm model from its kwargs (depth, width), so it comes before every "
                       "other change; grow first"))
register_extension(TrainerExtension("carry_optimizer_state", {}, lambda blocks, ts: None, always=True,
                                    started=started_carry))
for _stage in (GrowStage, MetaStage, IncubateStage, AssembleStage):
    register_stage(_stage)
register_section("assemble", Section("effvision.assemble.gpu_section:assemble_section",
                                     "effvision.assemble.gpu_section:assemble_markdown", priority=80, share=0.10,
                                     min_s=90, title="Deep Model Assembling (recipes/cifar10_vit_tiny.yaml's "
                                                     "convvit_small_32, K = 2, 3 vs end to end, equal compute)",
                                     recipes=("recipes/cifar10_vit_tiny.yaml",), data=("cifar10",)))
