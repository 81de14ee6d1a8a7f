"""kernels/ and export/ import as effvision.kernels and effvision.export, installed regularly
(a wheel) and editable (this venv)."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO


def _import_paths(extra_path: str | None, cwd: Path) -> list[str]:
    code = "import effvision, effvision.export, effvision.kernels; " \
           "print(effvision.__file__); print(effvision.export.__file__); print(effvision.kernels.__file__)"
    env_path = [extra_path] if extra_path else []
    r = subprocess.run([sys.executable, "-c", f"import sys; sys.path[:0] = {env_path!r}; {code}"],
                       cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_editable_install_maps_top_level_folders(tmp_path: Path) -> None:
    paths = _import_paths(None, tmp_path)
    assert paths == [str(REPO / "effvision" / "__init__.py"), str(REPO / "export" / "__init__.py"),
                     str(REPO / "kernels" / "__init__.py")]


def test_wheel_contains_and_imports_mapped_packages(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wheel = next((tmp_path / "dist").glob("effvision-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "effvision/export/onnx.py" in names and "effvision/kernels/__init__.py" in names
    # every package is found (setup.py), a technique's plugin.py included: no hand-kept list
    packages = {str(p.relative_to(REPO)) for p in (REPO / "effvision").rglob("*.py") if "__pycache__" not in p.parts}
    assert packages <= set(names), sorted(packages - set(names))
    assert not any(n.startswith(("export/", "kernels/", "tests/")) for n in names)
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    paths = _import_paths(str(target), tmp_path)
    assert paths == [str(target / "effvision" / "__init__.py"), str(target / "effvision" / "export" / "__init__.py"),
                     str(target / "effvision" / "kernels" / "__init__.py")]
