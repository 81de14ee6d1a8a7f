"""What techniques contribute to an export, registered from their ``plugin.py`` so that export/
imports no technique: ONNX translations of their custom ops (quantize's effvision::qdq), a view
of a model dir's quantization (what QDQ deployment needs), a float view of a fake-quant model
(the float graph onnxruntime quantizes itself), and manifest sections that describe a change
(sparse attention's export form)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch.nn as nn

__all__ = ["register_onnx_translations", "onnx_translations", "register_quantization_reader", "quantization_of",
           "register_float_view", "float_view", "register_manifest_section", "manifest_sections"]

_TRANSLATIONS: list[Callable[[int], dict]] = []                       # opset -> {torch op: ONNX function}
_QUANTIZATION: list[Callable[[Any], dict[str, Any] | None]] = []       # ModelSpec -> flat quantization or None
_FLOAT_VIEWS: list[Callable[[nn.Module], contextlib.AbstractContextManager]] = []
_MANIFEST: dict[str, Callable[[nn.Module], dict[str, Any] | None]] = {}  # section name -> (model -> section or None)


def _load() -> None:
    from effvision import plugins

    plugins.load_plugins()


def register_onnx_translations(fn: Callable[[int], dict]) -> None:
    _TRANSLATIONS.append(fn)


def onnx_translations(opset: int) -> dict:
    """Every registered custom-op translation for ``opset``."""
    _load()
    return {op: f for fn in _TRANSLATIONS for op, f in fn(opset).items()}


def register_quantization_reader(fn: Callable[[Any], dict[str, Any] | None]) -> None:
    _QUANTIZATION.append(fn)


def quantization_of(spec: Any) -> dict[str, Any] | None:
    """The quantization a model spec's record holds (precision, target, modules, ...), or None."""
    _load()
    return next((q for q in (fn(spec) for fn in _QUANTIZATION) if q is not None), None)


def register_float_view(fn: Callable[[nn.Module], contextlib.AbstractContextManager]) -> None:
    _FLOAT_VIEWS.append(fn)


@contextlib.contextmanager
def float_view(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every registered fake layer switched off (restored after)."""
    _load()
    with contextlib.ExitStack() as stack:
        for fn in _FLOAT_VIEWS:
            stack.enter_context(fn(model))
        yield model


def register_manifest_section(name: str, fn: Callable[[nn.Module], dict[str, Any] | None]) -> None:
    _MANIFEST[name] = fn


def manifest_sections(model: nn.Module) -> dict[str, Any]:
    """{section: value} of every registered section that describes ``model``."""
    _load()
    return {name: v for name, fn in _MANIFEST.items() if (v := fn(model)) is not None}
