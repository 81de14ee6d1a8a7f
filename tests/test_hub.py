"""`effvision push`: the staged folder is what timm's hub loader reads (loaded here through
timm's local-dir: source, same outputs as effvision's loader), and without a token, with
the Hub marked offline or with a bad repo id the push stops with one line and exit 2."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import effvision.models  # noqa: F401  (registers vit_micro_patch4_32)
from effvision.models import ModelSpec, load_model, save_model

from conftest import cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec(name="vit_micro_patch4_32", kwargs={"depth": 2}, num_classes=5,
                     class_names=["a", "b", "c", "d", "e"])
    from effvision.models.io import create_model

    return save_model(create_model(spec), spec, tmp_path_factory.mktemp("hub") / "model")


def test_staged_folder_loads_in_timm(model_dir: Path, tmp_path: Path) -> None:
    staged = tmp_path / "hub"
    p = cli("push", str(model_dir), "--repo", "alice/vit-micro", "--stage-only", str(staged))
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in staged.iterdir()) == ["README.md", "config.json", "model.json", "model.safetensors"]
    card = (staged / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm") and 'timm.create_model("hf-hub:alice/vit-micro"' in card
    hub_model = timm.create_model(f"local-dir:{staged}", pretrained=True).eval()
    ref, _ = load_model(model_dir)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(hub_model(x), ref.eval()(x))
    again = cli("push", str(model_dir), "--repo", "alice/vit-micro", "--stage-only", str(staged))
    assert again.returncode == 2 and "exists already" in again.stderr


def test_push_without_token_or_network_is_one_line_exit_2(model_dir: Path, tmp_path: Path) -> None:
    # an empty HF_TOKEN counts as none; a fresh HF_HOME has no stored token either
    base = {"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": "", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    cases = [({}, "no Hugging Face token"), ({"HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set")]
    for extra, message in cases:
        p = cli("push", str(model_dir), "--repo", "alice/vit-micro", env={**base, **extra})
        assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    bad = cli("push", str(model_dir), "--repo", "no-slash")
    assert bad.returncode == 2 and "expected USER/NAME" in bad.stderr
