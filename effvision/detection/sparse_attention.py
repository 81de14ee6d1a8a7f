"""Sparse attention in a detector's ViT backbone: profile on what the backbone sees (detection
images after the detector's transform, so at the detection token grid), swap its Attention
modules in place. The policies persist in ``DetectorSpec.attention`` and are applied again when
the detector is rebuilt (they cannot ride in the trunk's ModelSpec: the trunk is rebuilt at its
classification size before the backbone makes it take any size)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..attention import SparseAttentionConfig, sparsify_attention_
from ..data.coco import CocoSamples, detection_loader

__all__ = ["backbone_inputs", "sparsify_detector_"]


@torch.no_grad()
def backbone_inputs(detector: nn.Module, samples: CocoSamples, batches: int, batch_size: int = 8
                    ) -> list[torch.Tensor]:
    """The backbone's inputs for the first ``batches`` batches: (B, 3, H, W), normalized and resized."""
    seen: list[torch.Tensor] = []
    handle = detector.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    was_training = detector.training
    detector.eval()
    try:
        device = next(detector.parameters()).device
        for i, (images, _) in enumerate(detection_loader(samples, batch_size, shuffle=False)):
            if i == batches:
                break
            detector([im.to(device) for im in images])
    finally:
        handle.remove()
        detector.train(was_training)
    return seen


def sparsify_detector_(detector: nn.Module, cfg: SparseAttentionConfig, samples: CocoSamples,
                       device: torch.device | str = "cpu", batch_size: int = 8) -> dict[str, Any]:
    """Profile the backbone's attention on ``cfg.calib_batches`` batches of ``samples`` and swap
    its Attention modules in place; returns the policy spec (for ``DetectorSpec.attention``)."""
    cfg.validate()  # before any work
    calib = backbone_inputs(detector, samples, cfg.calib_batches, batch_size)
    return sparsify_attention_(detector.backbone, cfg, calib, device)
