"""Finding what techniques provide: every ``effvision.<package>.plugin`` module, and the
``effvision.plugins`` entry points of installed packages, imported once.

A technique's ``plugin.py`` is the one place it registers its mode (``models.modes``), its
stages (``engine.stage``), its trainer extensions (``engine.extensions``) and its benchmark
section (``benchmarks.registry``). Nothing in the core lists techniques: the registries call
:func:`load_plugins` before they are read. See docs/extending.md.
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from pathlib import Path

__all__ = ["load_plugins", "loaded_plugins", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "effvision.plugins"
_PACKAGE = Path(__file__).resolve().parent  # effvision/
_loaded: list[str] = []
_state = {"done": False}


def load_plugins() -> None:
    """Import every plugin module (idempotent; cheap after the first call)."""
    if _state["done"]:
        return
    _state["done"] = True  # set first: a plugin that reads a registry while importing does not recurse
    try:
        for info in sorted(pkgutil.iter_modules([str(_PACKAGE)]), key=lambda m: m.name):
            # a plugin.py file beside the package's __init__ (checked without importing the package)
            if info.ispkg and (_PACKAGE / info.name / "plugin.py").is_file():
                name = f"effvision.{info.name}.plugin"
                importlib.import_module(name)
                _loaded.append(name)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            ep.load()
            _loaded.append(f"{ep.value} (entry point {ep.name})")
    except BaseException:
        _state["done"] = False  # a failed import is retried (and raises again) on the next call
        _loaded.clear()
        raise


def loaded_plugins() -> list[str]:
    load_plugins()
    return list(_loaded)
