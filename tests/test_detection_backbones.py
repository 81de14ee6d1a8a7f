"""Coverage: backbones of many families (CNN, hierarchical ViT, plain ViT, effvision's own) in
torchvision detectors: build, one backward pass at one image size, inference at another.

Small variants and small images keep it fast; kwargs shrink the deeper ViTs where timm allows.
"""
from __future__ import annotations

import pytest
import torch

import effvision  # noqa: F401  (registers effvision's models)
from effvision.detection import backbone, build_detector

# (timm name, kwargs, detector): every family once, the three detectors spread over them.
FAMILIES = [
    ("efficientvit_b0", {}, "fasterrcnn"),
    ("mobilenetv3_small_050", {}, "retinanet"),
    ("mobilenetv4_conv_small", {}, "fcos"),
    ("convnext_atto", {}, "fasterrcnn"),
    ("resnet10t", {}, "retinanet"),
    ("deit_tiny_patch16_224", {"depth": 2}, "fasterrcnn"),       # plain ViT: simple pyramid
    ("levit_128s", {}, "fcos"),                                  # fixed 224x224 input
    ("tiny_vit_5m_224", {}, "fasterrcnn"),
    ("vit_micro_patch4_32", {}, "fcos"),                         # effvision's plain ViT
    ("convvit_tiny_32", {"depth": 2}, "retinanet"),              # effvision's conv-tokenizer ViT
]
SMALL_HEADS = {"fasterrcnn": {"representation_size": 64, "box_batch_size_per_image": 32,
                              "rpn_batch_size_per_image": 64},
               "retinanet": {}, "fcos": {}}


def _targets(n: int) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[8.0, 10.0, 60.0, 50.0], [30.0, 20.0, 90.0, 70.0]]),
             "labels": torch.tensor([1, 2 + i % 2])} for i in range(n)]


@pytest.mark.parametrize("name,kwargs,kind", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_backbone_family_in_detector(name: str, kwargs: dict, kind: str) -> None:
    torch.manual_seed(0)
    body = backbone(name, out_channels=32, kwargs=kwargs)
    assert body.out_channels == 32 and body.names[-1] == "pool"
    det = build_detector(kind, body, num_classes=4, min_size=96, max_size=160, **SMALL_HEADS[kind])

    # Training forward + backward on non-square images of one size.
    det.train()
    images = [torch.rand(3, 100, 140), torch.rand(3, 90, 150)]
    losses = det(images, _targets(2))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    trunk_grads = [p.grad for p in body.body.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in trunk_grads), "no gradient reached the trunk"

    # Inference at another size (taller than wide); boxes come back in that image's frame.
    det.eval()
    with torch.no_grad():
        (out,) = det([torch.rand(3, 150, 96)])
    assert set(out) == {"boxes", "scores", "labels"}
    if len(out["boxes"]):
        assert out["boxes"][:, 2].max() <= 96 + 1e-3 and out["boxes"][:, 3].max() <= 150 + 1e-3

    # The maps the heads saw: one per stride, all out_channels wide.
    side = body.fixed_size or (128, 192)
    with torch.no_grad():
        maps = body(torch.rand(1, 3, *side))
    assert list(maps) == body.names
    for (h, w), stride, m in zip([side] * len(maps), body.strides, maps.values()):
        assert m.shape[:2] == (1, 32)
        assert m.shape[-2] == -(-h // stride) or m.shape[-2] == h // stride


def test_pruned_vit_from_model_dir_in_detector(tmp_path) -> None:
    """effvision's pruned ViT (heads, MLP and embedding width removed) loads from its model dir
    (spec + safetensors) into a detector, and the pyramid follows the pruned width."""
    import copy

    import timm

    from effvision.compress import PruneSpec, prune_
    from effvision.models.io import ModelSpec, save_model

    torch.manual_seed(0)
    model = timm.create_model("vit_micro_patch4_32", num_classes=10)
    dense = copy.deepcopy(model)
    prune_(model, PruneSpec(ratios={"heads": 0.3, "mlp": 0.5, "width": 0.25}), torch.randn(2, 3, 32, 32))
    spec = ModelSpec("vit_micro_patch4_32", num_classes=10, img_size=32)  # the model carries its record
    assert model.embed_dim < dense.embed_dim
    save_model(model, spec, tmp_path / "model")

    body = backbone(str(tmp_path / "model"), out_channels=32)
    first = next(m for m in body.neck.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)))
    assert first.in_channels == model.embed_dim  # the pyramid reads the pruned width
    det = build_detector("fcos", body, num_classes=4, min_size=96, max_size=160)
    det.train()
    losses = det([torch.rand(3, 100, 140), torch.rand(3, 90, 150)], _targets(2))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    det.eval()
    with torch.no_grad():
        (out,) = det([torch.rand(3, 150, 96)])
    assert set(out) == {"boxes", "scores", "labels"}
