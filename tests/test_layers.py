"""The layers hold: import-linter's contracts (pyproject.toml, `lint-imports`) over effvision/,
and the same rules for export/ and kernels/, which import as effvision.export and
effvision.kernels but sit outside effvision/, where import-linter does not look: they import no
technique, recipe spine or face, and no module takes part in an import cycle."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

TECHNIQUES = ("compress", "dynamic", "tokens", "attention", "assemble", "optim", "detection", "curriculum")
ABOVE_ENGINE = (*TECHNIQUES, "stages", "pipeline", "recipe", "one_stage", "stability", "cli", "api", "benchmarks")
ROOTS = {"effvision": REPO / "effvision", "effvision.export": REPO / "export", "effvision.kernels": REPO / "kernels"}


def _modules() -> dict[str, Path]:
    out = {}
    for prefix, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if prefix == "effvision" and parts[0] in ("export", "kernels"):
                continue
            name = ".".join((prefix, *parts[:-1])) if parts[-1] == "__init__" else ".".join((prefix, *parts))
            out[name] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The effvision modules ``name`` imports anywhere in its body (function-level imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:  # "effvision.x.y" imports module effvision.x.y, else effvision.x
                t = t.rpartition(".")[0]
            if t and t != name and t != "effvision":
                found.add(t)
    return found


def test_lint_imports_contracts_hold() -> None:
    r = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in r.stdout


def test_export_and_kernels_import_nothing_above_the_engine() -> None:
    known = _modules()
    bad = [(name, t) for name, path in known.items() if name.startswith(("effvision.export", "effvision.kernels"))
           for t in _imports(name, path, known) if t.split(".")[1] in ABOVE_ENGINE]
    assert bad == [], f"export/kernels import what sits above them: {bad}"


def test_no_import_cycles_through_export_and_kernels() -> None:
    known = _modules()
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)

    assert cycles == [], f"import cycles: {cycles}"
