"""Deep Model Assembling (Deep Incubation, Ni et al.): divide a target ViT's blocks into K
modules, train each against a small frozen meta model, assemble.

Meta, incubated and assembled models are all plain timm VisionTransformers with different
``depth`` (no custom module classes): the meta model has the target width and one block per
module; incubating module i replaces meta block i by the target's n = depth/K fresh blocks and
freezes everything else (module 0 also owns the embeddings, the last module the final norm and
head). A module leaves its job as a directory (safetensors of its own weights + module.json with
the hashes of the meta model and the target spec), so the K jobs share nothing at run time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..errors import EffVisionError
from ..io import atomic_write_text
from ..models.io import WEIGHTS_FILE, ModelSpec, create_model

__all__ = ["module_blocks", "meta_spec", "spec_hash", "weights_hash", "incubation_model", "save_module",
           "assemble_modules", "check_modules", "read_module", "MODULE_FILE"]

MODULE_FILE = "module.json"
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


def target_depth(spec: ModelSpec) -> int:
    with torch.device("meta"):  # shapes only
        return len(create_model(spec).blocks)


def module_blocks(depth: int, modules: int) -> list[range]:
    """The target blocks of each module; K must divide the depth."""
    if modules < 2 or depth % modules:
        raise EffVisionError(f"modules: {modules} does not divide the target's {depth} blocks "
                             f"(choose a divisor >= 2 of {depth})")
    n = depth // modules
    return [range(i * n, (i + 1) * n) for i in range(modules)]


def meta_spec(target: ModelSpec, modules: int) -> ModelSpec:
    """The meta model: the target's width, one block per module."""
    return dataclasses.replace(target, kwargs=dict(target.kwargs, depth=modules))


def spec_hash(spec: ModelSpec) -> str:
    return hashlib.sha256(spec.to_json().encode()).hexdigest()[:16]


def weights_hash(model_dir: Path) -> str:
    return hashlib.sha256((Path(model_dir) / WEIGHTS_FILE).read_bytes()).hexdigest()[:16]


def _owns(key: str, module: int, modules: int) -> bool:
    """Non-block weights: module 0 owns the embeddings, the last module the final norm and head."""
    if key.startswith(("patch_embed.", "cls_token", "reg_token", "pos_embed")):
        return module == 0
    return module == modules - 1


def incubation_model(meta: nn.Module, target: ModelSpec, modules: int, module: int,
                     seed: int) -> tuple[nn.Module, ModelSpec]:
    """Meta model with block ``module`` replaced by the target's fresh blocks; only those (and the
    module's embeddings or head) train."""
    blocks = module_blocks(target_depth(target), modules)
    if not 0 <= module < modules:
        raise EffVisionError(f"module: {module} is out of range for {modules} modules (0..{modules - 1})")
    n = len(blocks[module])
    spec = dataclasses.replace(target, kwargs=dict(target.kwargs, depth=modules - 1 + n))
    torch.manual_seed(seed * 1000 + module)  # the fresh blocks' init, per module
    model = create_model(spec)
    fresh = model.state_dict()
    state = {}
    for key, value in meta.state_dict().items():
        m = _BLOCK.match(key)
        if not m:
            state[key] = value
            continue
        b = int(m.group(1))
        if b != module:  # meta blocks after the module shift by n - 1
            state[f"blocks.{b if b < module else b + n - 1}.{m.group(2)}"] = value
    for key, value in fresh.items():
        m = _BLOCK.match(key)
        if m and module <= int(m.group(1)) < module + n:
            state[key] = value
    model.load_state_dict(state, strict=True)
    for key, p in model.named_parameters():
        m = _BLOCK.match(key)
        p.requires_grad_(module <= int(m.group(1)) < module + n if m else _owns(key, module, modules))
    return model, spec


def save_module(model: nn.Module, target: ModelSpec, modules: int, module: int, meta_hash: str, directory: Path) -> Path:
    """The module's own weights (blocks renumbered to target indices) + module.json."""
    n = target_depth(target) // modules
    state = {}
    for key, value in model.state_dict().items():
        m = _BLOCK.match(key)
        if m and module <= int(m.group(1)) < module + n:
            state[f"blocks.{int(m.group(1)) - module + module * n}.{m.group(2)}"] = value.detach().contiguous().cpu()
        elif not m and _owns(key, module, modules):
            state[key] = value.detach().contiguous().cpu()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / WEIGHTS_FILE))
    info = {"module": module, "modules": modules, "meta_hash": meta_hash, "target_hash": spec_hash(target),
            "target": json.loads(target.to_json())}
    atomic_write_text(directory / MODULE_FILE, json.dumps(info, indent=2))
    return directory


def read_module(directory: Path) -> dict:
    path = Path(directory) / MODULE_FILE
    if not path.is_file() or not (Path(directory) / WEIGHTS_FILE).is_file():
        raise EffVisionError(f"no incubated module in {directory} (expected {MODULE_FILE} and {WEIGHTS_FILE})")
    return {**json.loads(path.read_text()), "dir": Path(directory)}


def check_modules(infos: list[dict]) -> int:
    """K, after checking that the modules come from one meta model and target and that modules
    0..K-1 are each present once (module.json only: cheap enough for a preflight)."""
    if not infos:
        raise EffVisionError("assemble needs module dirs; none were given or found")
    first = infos[0]
    for info in infos[1:]:
        for key in ("meta_hash", "target_hash", "modules"):
            if info[key] != first[key]:
                raise EffVisionError(f"modules differ in {key}: {first['dir']} has {first[key]}, "
                                     f"{info['dir']} has {info[key]} (assemble modules of one meta model and target)")
    modules = first["modules"]
    have = sorted(info["module"] for info in infos)
    if have != list(range(modules)):
        missing = sorted(set(range(modules)) - set(have))
        dup = sorted({i for i in have if have.count(i) > 1})
        parts = ([f"missing {missing}"] if missing else []) + ([f"duplicated {dup}"] if dup else [])
        raise EffVisionError(f"assemble needs modules 0..{modules - 1} once each: {', '.join(parts)}")
    return modules


def assemble_modules(dirs: list[Path]) -> tuple[nn.Module, ModelSpec, dict]:
    """The target model from K module directories; all must share the meta model and target spec."""
    infos = [read_module(d) for d in dirs]
    modules = check_modules(infos)
    first = infos[0]
    spec = ModelSpec.from_dict(first["target"])
    model = create_model(spec)
    state: dict[str, torch.Tensor] = {}
    for info in infos:
        state.update(load_file(str(info["dir"] / WEIGHTS_FILE)))
    model.load_state_dict(state, strict=True)
    return model, spec, {"meta_hash": first["meta_hash"], "target_hash": first["target_hash"], "modules": modules}
