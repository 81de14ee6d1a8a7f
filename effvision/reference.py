"""The reference pages of the documentation, generated from the code so they cannot drift: every
recipe key of every stage type (type, default and comment from the config dataclasses), every
command-line option (from the CLI's own parser) and the Python API page (mkdocstrings directives
for ``effvision.__all__`` and the stage configs). scripts/docs_hooks.py hands them to mkdocs.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import tokenize
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Union

__all__ = ["KeyRow", "field_comments", "recipe_keys", "stage_configs", "recipe_markdown", "cli_markdown",
           "api_objects", "api_markdown"]


@dataclass(frozen=True)
class KeyRow:
    """One recipe key: its dotted path, type, default and comment."""

    key: str
    type: str
    default: str
    comment: str


def _class_comments(cls: type) -> dict[str, str]:
    """``name -> comment`` for the fields written ``name: type = default  # comment`` in ``cls``'s own
    source (a comment on the lines just above a field counts when the field line has none)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):  # a class made at run time (the train stage's config with its extensions)
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    tokens = tokenize.generate_tokens(io.StringIO(src).readline)
    line_tokens: list[tokenize.TokenInfo] = []
    for tok in tokens:
        if tok.type not in (tokenize.NEWLINE, tokenize.NL):
            line_tokens.append(tok)
            continue
        significant = [t for t in line_tokens if t.type not in (tokenize.INDENT, tokenize.DEDENT)]
        comment = next((t.string.lstrip("#").strip() for t in significant if t.type == tokenize.COMMENT), "")
        code = [t for t in significant if t.type != tokenize.COMMENT]
        if not code and comment:
            above.append(comment)
        elif len(code) >= 2 and code[0].type == tokenize.NAME and code[1].string == ":" and code[0].start[1] == 4:
            out[code[0].string] = comment or " ".join(above)
            above = []
        else:
            above = []
        line_tokens = []
    return out


def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field of dataclass ``cls``, its base classes' included."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            out.update({k: v for k, v in _class_comments(base).items() if v})
    return out


def _type_str(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin is Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_str(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_type_str(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _default_str(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return ""
    elif f.default is dataclasses.MISSING:
        return "(required)"
    else:
        value = f.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(list(value) if isinstance(value, tuple) else value)


def _nested(tp: Any) -> type | None:
    """The dataclass a field's value is parsed into (``X``, ``X | None`` or ``list[X]``), if any."""
    if dataclasses.is_dataclass(tp):
        return tp
    for a in typing.get_args(tp):
        if dataclasses.is_dataclass(a):
            return a
    return None


def _rows(cls: type, prefix: str, skip: tuple[str, ...] = ()) -> Iterator[KeyRow]:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, key = hints[f.name], f"{prefix}{f.name}"
        inner = _nested(tp)
        if inner is None or typing.get_origin(tp) in (Union, types.UnionType):
            yield KeyRow(key, _type_str(tp), _default_str(f), comments.get(f.name, ""))
        if inner is not None:
            sub = f"{key}[]." if typing.get_origin(tp) in (list, tuple) else f"{key}."
            yield from _rows(inner, sub)


def stage_configs() -> dict[str, type]:
    """Every registered stage type and the dataclass its recipe entry is parsed into."""
    from .stages import stage_types

    return {name: stage.config_class() for name, stage in stage_types().items()}


def recipe_keys() -> dict[str, list[KeyRow]]:
    """``{"recipe": top-level keys, <stage type>: that stage's keys}``, each a list of rows."""
    from .recipe import Recipe

    out = {"recipe": list(_rows(Recipe, "", skip=("stages",)))}
    for name, cls in stage_configs().items():
        out[name] = list(_rows(cls, "", skip=("type",)))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|") if "\\|" not in text else text


def _table(rows: list[KeyRow]) -> list[str]:
    lines = ["| key | type | default | what |", "|---|---|---|---|"]
    for r in rows:
        default = f"`{_cell(r.default)}`" if r.default not in ("", "(required)") else r.default
        lines.append(f"| `{r.key}` | {r.type} | {default} | {_cell(r.comment)} |")
    return lines


def recipe_markdown() -> str:
    """The recipe-key reference page."""
    from .stages import stage_types

    keys = recipe_keys()
    lines = ["# Recipe keys", "",
             "Generated from the config dataclasses (`effvision/reference.py`): every key a recipe takes, with "
             "its type, default and the comment beside it in the code. A recipe is parsed strictly: an unknown "
             "key fails naming the closest valid one, and `--set a.b=c` goes through the same checks.", "",
             "## The recipe", "", "Top-level keys (`stages` is the list below).", "", *_table(keys["recipe"]), "",
             "## Stages", "", "Each entry of `stages` is a mapping with a `type`:", ""]
    stages, configs = stage_types(), stage_configs()

    def package(name: str) -> str:  # the technique's package (the generic mode stage lives in the engine)
        module = configs[name].__module__
        return (stages[name].__module__ if module.startswith("effvision.engine") else module).rsplit(".", 1)[0]

    lines += [f"- [`{name}`](#{name}) ({package(name)})" for name in keys if name != "recipe"]
    for name, rows in keys.items():
        if name == "recipe":
            continue
        doc = inspect.getdoc(stages[name]) or ""
        lines += ["", f"### {name}", ""]
        if doc:
            lines += [doc.split("\n\n")[0].replace("\n", " "), ""]
        lines += _table(rows) if rows else ["No keys besides `type`."]
    return "\n".join(lines) + "\n"


def _option_row(action: argparse.Action) -> str:
    flags = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.metavar or action.dest}`"
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        flags += " {" + ", ".join(str(c) for c in action.choices) + "}"
    default = action.default
    shown = "" if default in (None, False, argparse.SUPPRESS, []) else f"`{default}`"
    return f"| {flags} | {shown} | {_cell((action.help or '').replace(chr(10), ' '))} |"


def cli_markdown() -> str:
    """The command-line reference page, from the parser ``effvision`` itself uses."""
    from .cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = ["# Command line", "",
             "Generated from `effvision`'s own parser (`effvision/cli.py`); `effvision COMMAND --help` prints the "
             "same. Bad input prints one line and exits with code 2.", "",
             "```text", parser.format_usage().strip(), "```", ""]
    lines += ["| command | what |", "|---|---|"]
    lines += [f"| [`{c.dest}`](#{c.dest}) | {c.help} |" for c in sub._choices_actions]
    for name, p in sub.choices.items():
        lines += ["", f"## {name}", "", p.description or "", "", "```text", p.format_usage().strip(), "```", "",
                  "| option | default | what |", "|---|---|---|"]
        lines += [_option_row(a) for a in p._actions if not isinstance(a, argparse._HelpAction)]
        if p.epilog:
            lines += ["", "```text", p.epilog.strip(), "```"]
    return "\n".join(lines) + "\n"


def api_objects() -> list[str]:
    """The dotted paths the API page documents: ``effvision.__all__`` where it is defined, then every
    stage config and the recipe's own dataclasses."""
    import effvision

    paths = []
    for name in effvision.__all__:
        if name == "__version__":
            continue
        obj = getattr(effvision, name)
        paths.append(f"{obj.__module__}.{obj.__qualname__}")
    from .data.config import AugmentConfig, DataConfig
    from .engine.config import SchedulerConfig, TrainConfig
    from .engine.loggers import LogConfig
    from .engine.optim import OptimizerConfig
    from .recipe import ModelConfig, Recipe

    configs = [Recipe, ModelConfig, DataConfig, AugmentConfig, TrainConfig, OptimizerConfig, SchedulerConfig,
               LogConfig, *stage_configs().values()]
    for made in configs:
        # a class made at run time (a training stage's config with its extensions' keys): its base
        cls = next(c for c in made.__mro__ if getattr(inspect.getmodule(c), c.__name__, None) is c)
        path = f"{cls.__module__}.{cls.__qualname__}"
        if path not in paths:
            paths.append(path)
    return paths


def api_markdown() -> str:
    """The Python API page: a mkdocstrings directive per object of ``api_objects()``."""
    lines = ["# Python API", "",
             "Generated from the docstrings: everything `import effvision as ev` exports, then the config "
             "dataclasses a recipe is parsed into (their keys, defaults and comments: "
             "[Recipe keys](recipe.md)). The guide is [Python API](../python-api.md).", ""]
    paths = api_objects()
    split = next(i for i, p in enumerate(paths) if p.endswith(".Recipe"))
    lines += ["## `effvision`", ""] + [f"::: {p}\n" for p in paths[:split]]
    lines += ["## Recipe and stage configs", ""] + [f"::: {p}\n    options:\n      members: false\n"
                                                    for p in paths[split:]]
    return "\n".join(lines) + "\n"
