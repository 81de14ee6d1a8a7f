"""The documentation: the site builds in strict mode, the generated references cover every stage,
recipe key, command and option and the public API, marked examples run, recipes shown parse,
every figure table is generated from the ledger or marked as recorded by hand, and the README
stays short with working links."""
from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

import effvision
from conftest import REPO
from effvision import reference
from effvision.config import to_dict
from effvision.recipe import Recipe, parse_recipe

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
EXAMPLE = re.compile(r"<!-- example -->\n```python\n(.*?)```\n<!-- /example -->", re.S)
# Examples whose own test runs them with closer checks of what they print.
RUN_ELSEWHERE = {"docs/python-api.md": "tests/test_api.py::test_python_api_page_example_runs_as_written"}
# What may stand right before a table outside ledger and by-hand blocks: a table of text, or one
# generated and checked by another test.
TABLE_MARKS = {"<!-- text-table -->": "no figures",
               "<!-- composition-matrix -->": "tests/test_composition.py::test_composition_page_prints_this_matrix"}
# Recipes that need a plugin from outside effvision, parsed by the test that installs it.
PARSED_ELSEWHERE = {"docs/extending.md": "tests/test_extending.py::test_a_toy_technique_plugs_in_at_one_place"}


def _name(page: Path) -> str:
    return str(page.relative_to(REPO))


def test_site_builds_strict(tmp_path: Path) -> None:
    """mkdocs in strict mode: a broken link or anchor, a page left out of the nav or an API object
    that does not resolve fails the build (scripts/docs.sh builds the same way)."""
    mkdocs = Path(sys.executable).with_name("mkdocs")
    t0 = time.perf_counter()
    r = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env={"NO_MKDOCS_2_WARNING": "1",
                                                                         "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    site = tmp_path / "site"
    for page in ("index.html", "reference/recipe/index.html", "reference/cli/index.html",
                 "reference/api/index.html", "changelog/index.html"):
        assert (site / page).is_file(), page
    api = (site / "reference/api/index.html").read_text()
    assert 'id="effvision.api.prune"' in api and "Parameters:" in api and "Args:" not in api  # parsed sections
    print(f"mkdocs build: {time.perf_counter() - t0:.1f} s")


def _leaf_keys(value: Any, prefix: str = "") -> set[str]:
    if isinstance(value, dict) and value:
        return {k for key, v in value.items() for k in _leaf_keys(v, f"{prefix}{key}.")}
    return {prefix.rstrip(".")}


def _keys_of(cls: type) -> set[str]:
    """Every key of config ``cls``, found by parsing an empty mapping (defaults) and, for optional
    blocks that default to off, their own defaults: independent of the reference's field walk."""
    defaults = cls()  # the defaults, unvalidated: some blocks need a value to be valid (distill's teacher)
    keys = _leaf_keys(to_dict(defaults))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        inner = [a for a in typing.get_args(hints[f.name]) if dataclasses.is_dataclass(a)]
        if inner and getattr(defaults, f.name) is None:  # an optional block, off by default
            keys |= {f.name} | {f"{f.name}.{k}" for k in _keys_of(inner[0])}
    return keys


def test_recipe_reference_covers_every_stage_and_key() -> None:
    page = reference.recipe_markdown()
    configs = reference.stage_configs()
    assert {"train", "prune", "quantize", "export", "train_detection", "reduce_tokens"} <= set(configs)
    for stage, cls in configs.items():
        assert f"\n### {stage}\n" in page, f"stage type {stage} is missing from the recipe reference"
        section = page.split(f"\n### {stage}\n", 1)[1].split("\n### ", 1)[0]
        documented = set(re.findall(r"^\| `([^`]+)` \|", section, re.M))
        missing = {k for k in _keys_of(cls) if k != "type"} - documented
        assert not missing, f"stages {stage}: keys missing from the reference: {sorted(missing)}"
    top = page.split("## Stages", 1)[0]
    documented = set(re.findall(r"^\| `([^`]+)` \|", top, re.M))
    assert {k for k in _keys_of(Recipe) if not k.startswith("stages")} <= documented
    assert "| `data.augment.hflip` | bool | `true` | random horizontal flip |" in top  # type, default, comment


def test_cli_reference_covers_every_command_and_option() -> None:
    from effvision.cli import build_parser

    page = reference.cli_markdown()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert f"\n## {name}\n" in page, name
        section = page.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in section, f"effvision {name} {flag} is missing from the CLI reference"


def test_api_reference_covers_the_public_api_and_stage_configs() -> None:
    page = reference.api_markdown()
    directives = set(re.findall(r"^::: (\S+)$", page, re.M))
    for name in effvision.__all__:
        if name != "__version__":
            obj = getattr(effvision, name)
            assert f"{obj.__module__}.{obj.__qualname__}" in directives, name
    for stage, cls in reference.stage_configs().items():
        # a config made at run time (a training stage's, with its extensions' keys) by its base class
        documented = next(c for c in cls.__mro__ if getattr(sys.modules[c.__module__], c.__name__, None) is c)
        assert f"{documented.__module__}.{documented.__qualname__}" in directives, stage


def _examples() -> list[tuple[str, int, str]]:
    return [(_name(p), i, code) for p in PAGES for i, code in enumerate(EXAMPLE.findall(p.read_text()))]


def test_examples_are_found() -> None:
    where = {name for name, _, _ in _examples()}
    assert {"README.md", "docs/python-api.md"} <= where


_RUN_HERE = [e for e in _examples() if e[0] not in RUN_ELSEWHERE]


@pytest.mark.parametrize("page,index,code", _RUN_HERE, ids=[f"{p}-{i}" for p, i, _ in _RUN_HERE])
def test_marked_example_runs(page: str, index: int, code: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{page} example {index}:\n{r.stderr[-3000:]}"


def _yaml_blocks(page: Path) -> list[str]:
    return re.findall(r"^ *```yaml\n(.*?)^ *```", page.read_text(), re.S | re.M)


def _as_recipe(block: str) -> dict[str, Any]:
    """A recipe from what a page shows: a whole recipe, a list of stages, or the keys of a train stage."""
    data = yaml.safe_load(block)
    if isinstance(data, dict) and "stages" in data:
        return {**data}
    stages = data if isinstance(data, list) else [{"type": "train", **data}]
    return {"model": {"name": "vit_micro_patch4_32"}, "stages": stages}


def test_recipes_on_the_pages_parse() -> None:
    """Whole recipes are shown from recipes/ (a snippet include, never a copy); fragments parse."""
    from effvision.plugins import load_plugins

    load_plugins()
    blocks = [(p, b) for p in PAGES for b in _yaml_blocks(p) if _name(p) not in PARSED_ELSEWHERE]
    assert len(blocks) >= 5
    for page, block in blocks:
        text = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("--8<--"))
        if not text.strip():
            continue
        data = _as_recipe(text)
        assert not {"model", "data"} & set(yaml.safe_load(text) if isinstance(yaml.safe_load(text), dict) else {}), \
            f"{_name(page)}: a whole recipe is shown inline; include it from recipes/ with --8<--"
        try:
            parse_recipe(data)
        except effvision.ConfigError as e:
            pytest.fail(f"{_name(page)}: the recipe fragment does not parse: {e}\n{block}")
    for page in PAGES:
        for included in re.findall(r'--8<-- "([^"]+)"', page.read_text()):
            assert (REPO / included).is_file(), f"{_name(page)} includes {included}, which does not exist"
            if included.startswith("recipes/"):
                parse_recipe(yaml.safe_load((REPO / included).read_text()))


def _table_starts(text: str) -> list[int]:
    rows = [line.lstrip().startswith("|") for line in text.splitlines()]  # tables in list items are indented
    return [i for i, row in enumerate(rows) if row and (i == 0 or not rows[i - 1])]


def test_every_figure_table_is_generated_or_marked_by_hand() -> None:
    """A table lives in a ledger block (generated), a by-hand block that says so in words, or is
    marked as a table of text (no figures)."""
    for page in PAGES:
        lines = page.read_text().splitlines()
        starts = set(_table_starts(page.read_text()))
        block: str | None = None
        for i, line in enumerate(lines):
            if m := re.match(r" *<!-- (/?)(ledger:[\w-]+|by-hand) -->", line):
                block = None if m.group(1) else m.group(2)
                if block == "by-hand":
                    assert lines[i + 1].lstrip().startswith("*Recorded by hand, not reproduced"), \
                        f"{_name(page)}:{i + 2}"
            if i in starts and block is None:
                assert lines[i - 1].strip() in TABLE_MARKS, \
                    f"{_name(page)}:{i + 1}: a table outside a ledger or by-hand block: {line[:80]}"


def test_readme_is_short_and_its_links_work() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\((?!https?://)([^)#]+)", text):
        assert (REPO / target).exists(), f"README links to {target}, which does not exist"


def test_docs_script_builds_into_an_ignored_folder() -> None:
    script = (REPO / "scripts/docs.sh").read_text()
    assert "mkdocs build --strict" in script
    ignored = subprocess.run(["git", "check-ignore", "-q", "site/"], cwd=REPO)
    assert ignored.returncode == 0 or shutil.which("git") is None
