"""What effvision.compress provides: the ``prune`` and ``quantize`` modes and their stages, the
``distill`` and ``qat`` trainer extensions, and the gpu_bench section ``quantize``."""
from __future__ import annotations

from ..benchmarks.registry import Section, register_section
from ..engine.extensions import TrainerExtension, register_extension
from ..export.hooks import register_float_view, register_onnx_translations, register_quantization_reader
from ..engine.stage import register_stage
from ..models.modes import ANY, Mode, register_mode
from .distill_training import DistillConfig, preflight_distill, setup_distill
from .prune import MODE as PRUNE, PruneSpec, convert_pruned, restore_pruned
from .quantize import MODE as QUANTIZE, QuantConfig, restore_quantized
from .quantize.api import convert_quantized
from .quantize.persist import quantization, quantizers_off
from .quantize.qat import setup_qat
from .quantize.qdq_op import onnx_translations
from .stages import PruneStage, QuantizeStage

register_mode(Mode(PRUNE, version=1, restore=restore_pruned, config=PruneSpec, convert=convert_pruned))
register_mode(Mode(QUANTIZE, version=1, restore=restore_quantized, config=QuantConfig, convert=convert_quantized,
                   prohibits=(ANY,),
                   why="quantize comes last (its calibrated ranges hold for the layers as they are); apply the "
                       "other change before quantize, or fine-tune the quantized model (QAT) with a finetune stage"))
# qat quantizes the student before distillation wraps it; distillation wraps before the others change blocks
register_extension(TrainerExtension("qat", {"qat": QuantConfig}, setup_qat, order=5, modes=(QUANTIZE,)))
register_extension(TrainerExtension("distill", {"distill": DistillConfig}, setup_distill, order=10,
                                    preflight=preflight_distill))
register_stage(PruneStage)
register_stage(QuantizeStage)
register_section("quantize", Section("effvision.compress.quantize.gpu_section:quantize_section",
                                     "effvision.compress.quantize.gpu_section:quantize_markdown", priority=40,
                                     share=0.08, min_s=30, title="Quantization (deit_tiny, effvision.compress.quantize)",
                                     requires=("onnx", "onnxruntime", "onnxscript", "onnxslim")))
register_section("prune_distill", Section("effvision.compress.gpu_section:prune_distill_section",
                                          "effvision.compress.gpu_section:prune_distill_markdown", priority=50,
                                          share=0.24, min_s=90,
                                          title="Prune + distill, CIFAR-10 (recipes/cifar10_vit_prune_distill.yaml, "
                                                "50% MACs)", requires=("torch_pruning",),
                                          recipes=("recipes/cifar10_vit_prune_distill.yaml",), data=("cifar10",)))
# what QDQ deployment (effvision.export) needs of a quantized model
register_onnx_translations(onnx_translations)
register_quantization_reader(quantization)
register_float_view(quantizers_off)
