"""`effvision push`: the staged folder is what timm's hub loader reads (loaded here through
timm's local-dir: source, same outputs as effvision's loader), and without a token, with
the Hub marked offline or with a bad repo id the push stops with one line and exit 2."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import effvision.models  # noqa: F401  (registers vit_micro_patch4_32)
from effvision.cli import main
from effvision.models import ModelSpec, load_model, save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec(name="vit_micro_patch4_32", kwargs={"depth": 2}, num_classes=5,
                     class_names=["a", "b", "c", "d", "e"])
    from effvision.models.io import create_model

    return save_model(create_model(spec), spec, tmp_path_factory.mktemp("hub") / "model")


def test_staged_folder_loads_in_timm(model_dir: Path, tmp_path: Path, capsys) -> None:
    staged = tmp_path / "hub"
    assert main(["push", str(model_dir), "--repo", "alice/vit-micro", "--stage-only", str(staged)]) == 0
    assert sorted(f.name for f in staged.iterdir()) == ["README.md", "config.json", "model.json", "model.safetensors"]
    card = (staged / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm") and 'timm.create_model("hf-hub:alice/vit-micro"' in card
    hub_model = timm.create_model(f"local-dir:{staged}", pretrained=True).eval()
    ref, _ = load_model(model_dir)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(hub_model(x), ref.eval()(x))
    capsys.readouterr()
    assert main(["push", str(model_dir), "--repo", "alice/vit-micro", "--stage-only", str(staged)]) == 2
    assert "exists already" in capsys.readouterr().err


def test_push_without_token_or_network_is_one_line_exit_2(model_dir: Path, tmp_path: Path, capsys,
                                                          monkeypatch) -> None:
    from huggingface_hub import constants

    # no token: an empty HF_TOKEN counts as none and the token file is a missing one; the Hub is
    # marked offline too (what HF_HUB_OFFLINE=1 sets at import), so a developer's own token
    # could never reach the Hub from this test
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["push", str(model_dir), "--repo", "alice/vit-micro"]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token")  # a token, but the Hub is offline
    assert main(["push", str(model_dir), "--repo", "alice/vit-micro"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert main(["push", str(model_dir), "--repo", "no-slash"]) == 2
    assert "expected USER/NAME" in capsys.readouterr().err
