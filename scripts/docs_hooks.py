"""mkdocs hooks (mkdocs.yml `hooks:`): pages generated at build time, so they are never stored
twice and never drift: the home page is the README (its links made relative to docs/), and the
reference pages come from the code (effvision/reference.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

GENERATED = {"reference/recipe.md": "recipe_markdown", "reference/cli.md": "cli_markdown",
             "reference/api.md": "api_markdown"}
README = Path(__file__).resolve().parents[1] / "README.md"


def on_files(files: Files, config: Any) -> Files:
    from effvision import reference

    home = README.read_text().replace("](docs/", "](")
    files.append(File.generated(config, "index.md", content=home))
    for path, fn in GENERATED.items():
        files.append(File.generated(config, path, content=getattr(reference, fn)()))
    return files
