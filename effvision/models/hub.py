"""``effvision push``: a model dir to the Hugging Face Hub in timm's hub layout, through
huggingface_hub (a timm dependency, so always installed).

The staged folder is what ``timm.create_model("hf-hub:USER/NAME", pretrained=True)`` reads:
config.json (architecture, num_classes, pretrained_cfg) and model.safetensors, plus
effvision's model.json, whose record of modes rebuilds a pruned, quantized or otherwise changed
model (a model dir from before the record is staged with its record migrated), and a generated
model card (README.md). Staged locally first, so a missing token or network fails before
anything is uploaded."""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import EffVisionError
from ..io import atomic_write_text
from .io import SPEC_FILE, TIMM_CONFIG_FILE, WEIGHTS_FILE, ModelSpec, read_spec, timm_config

__all__ = ["stage_for_hub", "push_to_hub", "model_card"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def _timm_loadable(spec: ModelSpec) -> bool:
    """A model with no modes (dense, float, plain): timm itself rebuilds it from config.json + weights."""
    return not spec.modes


def model_card(spec: ModelSpec, repo_id: str) -> str:
    timm_ok = _timm_loadable(spec)
    kinds = [m["mode"].replace("_", " ") for m in spec.modes]
    import timm

    own = timm.is_model(spec.name) and timm.models.model_entrypoint(spec.name).__module__.startswith("effvision")
    register = f"import effvision.models  # registers {spec.name} with timm\n" if own else ""
    load = (f'import timm\n{register}\nmodel = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()\n'
            if timm_ok else
            f'from huggingface_hub import snapshot_download\nfrom effvision.models import load_model\n\n'
            f'model, spec = load_model(snapshot_download("{repo_id}"))  # {", ".join(kinds)}: not a plain timm '
            f'architecture\n')
    classes = ", ".join(spec.class_names) if spec.class_names else f"{spec.num_classes} classes (no names recorded)"
    return (f"---\nlibrary_name: timm\ntags:\n- image-classification\n- timm\n- effvision\n---\n\n"
            f"# {repo_id.split('/')[1]}\n\n"
            f"A `{spec.name}` image classifier made with effvision "
            f"({', '.join(kinds) if kinds else 'dense'}).\n\n"
            f"## Load\n\n```python\n{load}```\n\n"
            f"## Input\n\n- size: {spec.in_chans}x{spec.img_size}x{spec.img_size}\n"
            f"- normalisation: pixels / 255, then (x - mean) / std with mean {list(spec.mean)}, std {list(spec.std)}\n"
            f"- classes: {classes}\n\n"
            f"Files: `config.json` and `model.safetensors` in timm's hub layout; `model.json` is effvision's "
            f"architecture spec.\n")


def stage_for_hub(model_dir: str | Path, out: str | Path, repo_id: str) -> Path:
    """Copy the model files and write the model card into ``out`` (must not exist)."""
    model_dir, out = Path(model_dir), Path(out)
    missing = [f for f in (SPEC_FILE, WEIGHTS_FILE, TIMM_CONFIG_FILE) if not (model_dir / f).is_file()]
    if missing:
        raise EffVisionError(f"{model_dir} is not a complete model dir (missing {', '.join(missing)})")
    if out.exists():
        raise EffVisionError(f"{out} exists already; choose another folder (nothing was overwritten)")
    spec = read_spec(model_dir)
    out.mkdir(parents=True)
    shutil.copy2(model_dir / WEIGHTS_FILE, out / WEIGHTS_FILE)
    atomic_write_text(out / TIMM_CONFIG_FILE, json.dumps(timm_config(spec), indent=2))
    atomic_write_text(out / SPEC_FILE, spec.to_json())
    atomic_write_text(out / "README.md", model_card(spec, repo_id))
    return out


def _check_repo_id(repo_id: str) -> None:
    if not _REPO_ID.match(repo_id):
        raise EffVisionError(f"--repo '{repo_id}': expected USER/NAME (letters, digits, '-', '_', '.')")


def push_to_hub(model_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> dict[str, Any]:
    """Stage, then create the repo (if new) and upload the folder in one commit."""
    _check_repo_id(repo_id)
    from huggingface_hub import HfApi, constants, get_token

    token = token or get_token()
    if not token:
        raise EffVisionError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (nothing was uploaded)")
    if constants.HF_HUB_OFFLINE:
        raise EffVisionError("HF_HUB_OFFLINE is set: the Hub cannot be reached (nothing was uploaded)")
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_for_hub(model_dir, Path(tmp) / "hub", repo_id)
        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=staged,
                                       commit_message=f"effvision: upload {Path(model_dir).name}")
        except Exception as e:  # network and HTTP errors come in many types; one line for the user
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EffVisionError(f"upload to the Hugging Face Hub failed ({type(e).__name__}): {first}") from e
        files = sorted(p.name for p in staged.iterdir())
        timm_ok = _timm_loadable(read_spec(staged))
    return {"repo": repo_id, "url": str(url), "commit": getattr(commit, "commit_url", str(commit)),
            "private": private, "files": files, "timm_loadable": timm_ok}
