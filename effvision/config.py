"""Typed configuration: parse plain dicts (from YAML) into dataclasses, strictly.

Unknown keys fail with the closest valid name; values are type-checked against the
dataclass annotations; ``--set a.b=c`` overrides are applied to the raw dict first so they
go through the same checks.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError

__all__ = ["parse", "to_dict", "load_yaml", "apply_overrides", "field_default", "field_choices"]


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads 2e-3 as a string (it wants 2.0e-3); accept what a user means.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def parse(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; ``where`` names the position for errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key '{_join(where, key)}'{_suggest(str(key), fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{_join(where, name)}'")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where)
    return obj


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass ``cls``'s field ``name``: CLI flags and API defaults read it, so the
    recipe, the API and the command line agree."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def field_choices(cls: type, name: str) -> list[Any]:
    """The values a ``Literal`` field of dataclass ``cls`` takes (for CLI choices)."""
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) is not Literal:
        raise TypeError(f"{cls.__name__}.{name} is not a Literal field")
    return list(typing.get_args(tp))


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict (for YAML/JSON), keeping the stage ``type`` tag."""
    if dataclasses.is_dataclass(obj):
        out = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a text (UTF-8) file: byte {e.start} cannot be decoded; "
                          f"a recipe is a YAML file") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"malformed YAML in {path}{pos}: {problem}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply ``a.b=c`` overrides to a raw recipe dict (values parsed as YAML scalars).

    List items are addressed by index (``stages.0.epochs``) or, for stages, by their type
    (``stages.train.epochs``). Keys that do not exist are created so that the schema check
    reports them with a suggestion.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            node = _step(node, part, ".".join(parts[: i + 1]))
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, key)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override '{key}': '{'.'.join(parts[:-1])}' is not a mapping")
    return data


def _index(seq: list, part: str, key: str) -> int:
    if re.fullmatch(r"-?[0-9]+", part):  # not str.isdigit(): '²' is a digit that int() refuses
        idx = int(part)
        if not -len(seq) <= idx < len(seq):
            raise ConfigError(f"override '{key}': index {idx} out of range ({len(seq)} items)")
        return idx
    matches = [i for i, v in enumerate(seq) if isinstance(v, dict) and v.get("type") == part]
    if len(matches) != 1:
        kinds = [v.get("type") for v in seq if isinstance(v, dict)]
        what = "no" if not matches else "more than one"
        raise ConfigError(f"override '{key}': {what} item of type '{part}' (have {kinds}); use an index")
    return matches[0]


def _step(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if isinstance(node, dict):
        if node.get(part) is None:
            node[part] = {}
        return node[part]
    raise ConfigError(f"override '{key}': cannot descend into {node!r}")
