"""What effvision.attention provides: the ``sparse_attention`` mode and stage, and the gpu_bench
section ``sparse_attention``."""
from __future__ import annotations

from ..benchmarks.registry import Section, register_section
from ..engine.stage import register_stage
from ..export.hooks import register_manifest_section
from ..models.modes import Mode, register_mode
from . import convert_sparse
from .export import export_summary
from .persist import MODE, legacy_policies, restore_policies
from .profile import SparseAttentionConfig
from .stage import SparseAttentionStage

register_mode(Mode(MODE, version=1, restore=restore_policies, config=SparseAttentionConfig, convert=convert_sparse,
                   prohibits=("prune", "reduce_tokens", "contextual_sparsity", MODE),
                   why="per-head policies hold for the heads and the token grid they were profiled on; prune, "
                       "or attach exits before sparse_attention (profiled once); it does not combine with "
                       "reduce_tokens or contextual_sparsity",
                   legacy=legacy_policies))
register_stage(SparseAttentionStage)
register_section("sparse_attention", Section("effvision.attention.gpu_section:sparse_attention_section",
                                             "effvision.attention.gpu_section:sparse_attention_markdown", priority=70,
                                             share=0.08, min_s=45,
                                             title="Block-sparse attention (B 8, H 6, D 64, bf16, block 64; effvision "
                                                   "kernel and FlexAttention vs dense SDPA)", requires=("triton",)))
register_manifest_section("sparse_attention", export_summary)  # per policy kind, the export form
