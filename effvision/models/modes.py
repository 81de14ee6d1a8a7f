"""The record of what was done to a model: an ordered list of modes, each restorable.

A mode is one technique's change to a model (prune, quantize, reduce_tokens, ...), after
NVIDIA ModelOpt's mode state and torchao's versioned configs. A technique registers its
:class:`Mode` once (in its package's ``plugin.py``); its verb converts the model in place and
calls :func:`add_mode`, which checks the rules against what the model went through before and
appends one entry to the model's record::

    {"mode": "prune", "version": 1, "config": {...what was asked...}, "metadata": {...what restore needs...}}

The record travels with the model object (``record_of(model)``) and in ``model.json``
(``ModelSpec.modes``); loading replays each entry's ``restore`` on a fresh timm model, in
order, before the weights load. Entries of older versions are upgraded on read; model dirs
written before the record existed (``pruned``, ``transforms``, ``quant.json``) are migrated by
:func:`migrate_legacy`.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..errors import EffVisionError

__all__ = ["Mode", "Convert", "ModeRuleError", "register_mode", "get_mode", "registered_modes", "record_of", "set_record",
           "add_mode", "update_metadata", "check_next", "restore_modes", "find_mode", "migrate_legacy", "config_dict",
           "ANY"]

RECORD_ATTR = "_effvision_modes"
ANY = "*"  # in ``prohibits``: every mode, including those registered later

Entry = dict[str, Any]
Restore = Callable[[nn.Module, dict[str, Any], dict[str, Any]], None]
# (model, config, calibration images (B, C, H, W) or None) -> a report: the verb in one signature
Convert = Callable[[nn.Module, Any, "list[torch.Tensor] | None"], dict[str, Any]]


class ModeRuleError(EffVisionError):
    """A composition of modes that cannot work (one rule of a registered mode names why)."""


@dataclass(frozen=True)
class Mode:
    """One technique's change to a model. ``convert(model, config, calib)`` is its verb in one
    signature (in place; the record gains the entry): the generic mode stage and tools call it
    (None where the verb makes a new model, as growth does). ``restore(model, config, metadata)``
    rebuilds the change on a fresh model (the weights load after it). ``prohibits`` names the modes that may not
    follow this one (``ANY``: none may), ``only_after`` the modes allowed before it (None: any),
    and ``why`` says why, for the one-line refusal. ``upgrade[v]`` turns an entry of version v
    into one of version v + 1; ``legacy(params)`` turns a pre-record transform entry (model.json
    ``transforms``) into (config, metadata)."""

    name: str
    version: int
    restore: Restore
    config: type | None = None
    convert: Convert | None = None
    prohibits: tuple[str, ...] = ()
    only_after: tuple[str, ...] | None = None
    why: str = ""
    upgrade: Mapping[int, Callable[[Entry], Entry]] = field(default_factory=dict)
    legacy: Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]] | None = None


_MODES: dict[str, Mode] = {}


def register_mode(mode: Mode) -> Mode:
    _MODES[mode.name] = mode
    return mode


def registered_modes() -> dict[str, Mode]:
    from .. import plugins

    plugins.load_plugins()
    return dict(_MODES)


def get_mode(name: str) -> Mode:
    modes = registered_modes()
    if name not in modes:
        raise EffVisionError(f"unknown model mode {name!r} (known: {', '.join(sorted(modes))}); "
                             f"the model was made by a newer effvision or a plugin that is not installed")
    return modes[name]


def config_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass (or mapping) as plain JSON data."""
    if dataclasses.is_dataclass(cfg):
        return copy.deepcopy(dataclasses.asdict(cfg))  # type: ignore[arg-type]
    return copy.deepcopy(dict(cfg or {}))


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def record_of(model: nn.Module) -> list[Entry]:
    """The modes applied to ``model``, oldest first (a copy; empty for a plain timm model)."""
    return copy.deepcopy(getattr(_unwrap(model), RECORD_ATTR, []))


def set_record(model: nn.Module, entries: list[Entry]) -> None:
    setattr(_unwrap(model), RECORD_ATTR, copy.deepcopy(list(entries)))


def check_next(record: list[Entry] | list[str], name: str) -> None:
    """Raise ModeRuleError if mode ``name`` may not follow the modes of ``record`` (entries or names)."""
    mode = get_mode(name)
    before = [e if isinstance(e, str) else e["mode"] for e in record]
    for prev_name in before:
        prev = get_mode(prev_name)
        if name in prev.prohibits or ANY in prev.prohibits:
            raise ModeRuleError(f"{name} cannot follow {prev_name}: {prev.why}")
    if mode.only_after is not None:
        bad = [p for p in before if p not in mode.only_after]
        if bad:
            raise ModeRuleError(f"{name} cannot follow {bad[0]}: {mode.why}")


def add_mode(model: nn.Module, name: str, config: Any = None, metadata: Mapping[str, Any] | None = None) -> Entry:
    """Append mode ``name`` to ``model``'s record (after its rules are checked); returns the entry.
    Verbs call this once their change is made (or before, to refuse early: ``check_next``)."""
    record = record_of(model)
    check_next(record, name)
    entry = {"mode": name, "version": get_mode(name).version, "config": config_dict(config),
             "metadata": copy.deepcopy(dict(metadata or {}))}
    set_record(model, [*record, entry])
    return entry


def update_metadata(model: nn.Module, name: str, **values: Any) -> Entry:
    """Merge ``values`` into the metadata of the model's newest entry, which must be mode ``name``
    (a verb completing its own change: a calibrated exit threshold, layers measured back to float)."""
    record = record_of(model)
    if not record or record[-1]["mode"] != name:
        raise EffVisionError(f"the model's newest mode is {record[-1]['mode'] if record else 'none'}, not {name}")
    record[-1]["metadata"].update(copy.deepcopy(values))
    set_record(model, record)
    return record[-1]


# What a mode's restore, upgrade or legacy reader raises on parameters that do not fit the model (a
# corrupt or hand-edited record): a missing key, a wrong type or size, a module the model lacks.
_BAD_PARAMETERS = (LookupError, TypeError, ValueError, AttributeError, RuntimeError, AssertionError)


def _current(entry: Entry, where: str) -> Entry:
    if not isinstance(entry, dict) or not isinstance(entry.get("mode"), str) or type(entry.get("version")) is not int:
        raise EffVisionError(f"{where}: a mode entry needs 'mode' (a name) and 'version' (an integer), got {entry!r}")
    mode = get_mode(entry["mode"])
    entry = {"config": {}, "metadata": {}, **entry}
    if not isinstance(entry["config"], dict) or not isinstance(entry["metadata"], dict):
        raise EffVisionError(f"{where}: the {mode.name} entry's 'config' and 'metadata' are not both JSON objects")
    while entry["version"] < mode.version:
        step = mode.upgrade.get(entry["version"])
        if step is None:
            raise EffVisionError(f"{where}: {mode.name} version {entry['version']} cannot be upgraded to "
                                 f"{mode.version} (no upgrade registered)")
        try:
            entry = step(entry)
        except _BAD_PARAMETERS as e:
            raise EffVisionError(f"{where}: {mode.name} version {entry['version']} has bad parameters: {e}") from e
    if entry["version"] > mode.version:
        raise EffVisionError(f"{where}: {mode.name} version {entry['version']} is newer than this effvision reads "
                             f"({mode.version}); upgrade effvision")
    return entry


def restore_modes(model: nn.Module, entries: list[Entry], where: str = "model spec") -> nn.Module:
    """Replay ``entries`` on ``model`` (a fresh timm model) in order; the record is set on it."""
    current = [_current(e, where) for e in entries]
    for entry in current:  # rules gate new compositions only: a saved record always loads
        try:
            get_mode(entry["mode"]).restore(model, entry["config"], entry["metadata"])
        except _BAD_PARAMETERS as e:
            raise EffVisionError(f"{where}: mode {entry['mode']} has bad parameters: {e}") from e
    set_record(model, current)
    return model


def find_mode(entries: list[Entry], name: str) -> Entry | None:
    """The newest entry of mode ``name`` in a record, or None."""
    for entry in reversed(entries):
        if entry.get("mode") == name:
            return entry
    return None


def migrate_legacy(pruned: dict[str, Any] | None, transforms: list[dict[str, Any]] | None,
                   quant: dict[str, Any] | None, where: str = "model spec") -> list[Entry]:
    """The record of a model dir written before the record existed: pruning first, then the
    transforms in their order, then quantization (the only order those dirs could hold)."""
    if pruned is not None and not isinstance(pruned, dict):
        raise EffVisionError(f"{where}: 'pruned' is not a JSON object")
    transforms = [] if transforms is None else transforms
    if not isinstance(transforms, list) or not all(isinstance(t, dict) for t in transforms):
        raise EffVisionError(f"{where}: 'transforms' is not a list of JSON objects")
    entries: list[Entry] = []
    if pruned:
        entries.append({"mode": "prune", "version": 1, "config": {}, "metadata": copy.deepcopy(pruned)})
    for t in transforms:
        params = dict(t)
        name = params.pop("name", None)
        modes = registered_modes()
        if not isinstance(name, str) or name not in modes or modes[name].legacy is None:
            raise EffVisionError(f"{where} lists unknown transform {name!r} "
                                 f"(known: {', '.join(sorted(n for n, m in modes.items() if m.legacy))})")
        try:
            config, metadata = modes[name].legacy(params)
        except _BAD_PARAMETERS as e:
            raise EffVisionError(f"{where}: transform {name} has bad parameters: {e}") from e
        entries.append({"mode": name, "version": 1, "config": config, "metadata": metadata})
    if quant is not None:
        q = dict(quant)
        metadata = {"modules": q.pop("modules", []), **{k: q.pop(k) for k in ("calibration", "fallback", "int8_layers")
                                                        if k in q}}
        q.pop("version", None)
        entries.append({"mode": "quantize", "version": 1, "config": q, "metadata": metadata})
    return entries
