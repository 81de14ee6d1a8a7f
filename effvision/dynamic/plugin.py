"""What effvision.dynamic provides: the ``reduce_tokens``, ``early_exit`` and
``contextual_sparsity`` modes, their stages, the ``keep_schedule`` trainer extension and the
gpu_bench section ``dynamic``."""
from __future__ import annotations

from ..benchmarks.registry import Section, register_section
from ..engine.extensions import TrainerExtension, register_extension
from ..engine.mode_stage import mode_stage
from ..engine.stage import register_stage
from ..models.modes import ANY, Mode, register_mode
from .contextual import MODE as CONTEXTUAL, ContextualConfig, legacy_contextual, restore_contextual
from .contextual_train import contextual_sparsity_
from .early_exit import MODE as EARLY_EXIT, ExitConfig, convert_exits, legacy_exit, restore_exits
from .keep_schedule import KeepScheduleConfig, setup_keep_schedule
from .reduce import MODE as REDUCE_TOKENS, TokenReduceConfig, convert_reduced, restore_reduced
from .stages import ContextualSparsityStage, EarlyExitStage, reduce_preflight

REDUCE = register_mode(Mode(
    REDUCE_TOKENS, version=1, restore=restore_reduced, config=TokenReduceConfig, convert=convert_reduced,
    prohibits=("prune", REDUCE_TOKENS, "sparse_attention", CONTEXTUAL, EARLY_EXIT),
    why="token reduction changes every later block's token count and swaps the blocks' class; "
        "prune before reduce_tokens; it does not combine with sparse_attention, early_exit or "
        "contextual_sparsity in either order",
    legacy=lambda params: (dict(params), {})))
register_mode(Mode(EARLY_EXIT, version=1, restore=restore_exits, config=ExitConfig, convert=convert_exits,
                   prohibits=("prune", REDUCE_TOKENS, CONTEXTUAL, EARLY_EXIT),
                   why="the exit heads are sized and placed for the blocks as they are, and run them one by one; "
                       "prune or sparsify attention before early_exit; it does not combine with reduce_tokens "
                       "or contextual_sparsity",
                   legacy=legacy_exit))
register_mode(Mode(CONTEXTUAL, version=1, restore=restore_contextual, config=ContextualConfig,
                   convert=contextual_sparsity_, prohibits=(ANY,),
                   why="contextual sparsity computes each image's heads and neurons with its own gathered "
                       "kernels, which later changes would bypass; it comes last",
                   legacy=legacy_contextual))

register_extension(TrainerExtension("keep_schedule", {"keep_schedule": KeepScheduleConfig}, setup_keep_schedule,
                                    order=40))

register_stage(mode_stage("reduce_tokens", REDUCE, preflight=reduce_preflight,
                          doc="The reduce_tokens stage: ToMe token merging or EViT token pruning on the newest "
                              "model, training-free (a later finetune stage trains the reduced model)."))
for _stage in (EarlyExitStage, ContextualSparsityStage):
    register_stage(_stage)
register_section("dynamic", Section("effvision.dynamic.gpu_section:dynamic_section",
                                    "effvision.dynamic.gpu_section:dynamic_markdown", priority=45, share=0.05, min_s=30,
                                    title="Dynamic inference (deit_small_patch16_224 random init, bf16: ToMe r=13 and "
                                          "EViT keep 0.7 vs dense at batch 256; contextual sparsity gather path vs "
                                          "dense at batch 1 and 8)"))
