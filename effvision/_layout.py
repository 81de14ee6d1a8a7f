"""Import ``effvision.export`` and ``effvision.kernels`` from a source checkout.

The design card puts export/ and kernels/ at the repository's top level. Installs (regular
or editable) map them into the effvision namespace through pyproject's package-dir; this
finder does the same when the checkout is simply on PYTHONPATH (as on the GPU machine,
where nothing is installed). It sits last on sys.meta_path, so installed packages win.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_MAPPED = {"effvision.export": _ROOT / "export", "effvision.kernels": _ROOT / "kernels"}


class _TopLevelFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # type: ignore[override]
        for name, folder in _MAPPED.items():
            if fullname == name:
                return importlib.util.spec_from_file_location(
                    fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])
        return None


def install() -> None:
    if all((f / "__init__.py").is_file() for f in _MAPPED.values()) and \
            not any(isinstance(f, _TopLevelFinder) for f in sys.meta_path):
        sys.meta_path.append(_TopLevelFinder())
