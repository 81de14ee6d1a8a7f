"""Load galore-torch 1.0's AdamW and Adafactor (the references) without its package
__init__, which imports bitsandbytes, and without transformers, which those modules import
only for a ``require_version("torch>=1.5.0")`` assertion: a stand-in for that one function is
installed, the optimizer and projector code run unmodified."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any


def load_reference_adamw() -> Any | None:
    """galore_torch.adamw.AdamW, or None when galore-torch is not installed."""
    return _load("adamw", "AdamW")


def load_reference_adafactor() -> Any | None:
    """galore_torch.adafactor.Adafactor, or None when galore-torch is not installed."""
    return _load("adafactor", "Adafactor")


def _load(module: str, cls: str) -> Any | None:
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    # the stand-in lives in sys.modules only while the reference module imports
    versions = types.ModuleType("transformers.utils.versions")
    versions.require_version = lambda requirement, hint=None: None
    stubs = {"transformers": types.ModuleType("transformers"), "transformers.utils": types.ModuleType("transformers.utils"),
             "transformers.utils.versions": versions}
    stubs["transformers"].utils = stubs["transformers.utils"]
    stubs["transformers.utils"].versions = versions
    # a private package name, so the real galore_torch/__init__ (bitsandbytes) never runs
    pkg_name = "_galore_ref"
    if pkg_name not in sys.modules:
        pkg = types.ModuleType(pkg_name)
        pkg.__path__ = [str(root)]
        sys.modules[pkg_name] = pkg
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        for mod in ("galore_projector", module):
            full = f"{pkg_name}.{mod}"
            if full not in sys.modules:
                s = importlib.util.spec_from_file_location(full, root / f"{mod}.py")
                loaded = importlib.util.module_from_spec(s)
                sys.modules[full] = loaded
                s.loader.exec_module(loaded)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return getattr(sys.modules[f"{pkg_name}.{module}"], cls)
