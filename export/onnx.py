"""ONNX export through torch.export (``torch.onnx.export(dynamo=True)``), with a parity check
in onnxruntime and a manifest.

The exporter always sees the plain PyTorch model (reference paths, no Triton kernels), so
the graph stays standard ONNX that onnxruntime and TensorRT read.
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from effvision.errors import EffVisionError

__all__ = ["OnnxExportConfig", "export_onnx", "check_parity", "ParityError", "MIN_OPSET", "MAX_OPSET"]

MIN_OPSET, MAX_OPSET = 13, 23


class ParityError(EffVisionError):
    """onnxruntime's output differs from PyTorch's beyond the tolerance."""


@dataclass
class OnnxExportConfig:
    opset: int = 18
    dynamic_batch: bool = True
    parity_batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    atol: float = 1e-4   # fp32 max abs error allowed between PyTorch and onnxruntime
    dynamic_hw: bool = False  # height and width dynamic too (multiples of hw_multiple), where the model allows
    hw_multiple: int = 32

    def parity_sizes(self, input_shape: tuple[int, int, int]) -> list[tuple[int, int]]:
        """(H, W) the parity check runs at: the export size, and with dynamic H/W a second,
        non-square one, so a graph that specialised to one size fails the check."""
        h, w = input_shape[1:]
        return [(h, w), (h + self.hw_multiple, w + 2 * self.hw_multiple)] if self.dynamic_hw else [(h, w)]


def _gelu_onnx(x, approximate: str = "none"):
    """GELU in the node order onnxruntime's Gelu/BiasGelu fusion matches, x * (1 + erf(x / sqrt2))
    * 0.5. The exporter's own decomposition multiplies 0.5 into (1 + erf) first, a pattern
    onnxruntime leaves as five elementwise ops per MLP: ~10% of deit_tiny's time at batch 32
    (the TorchScript exporter's graph, which fuses, was that much faster)."""
    from onnxscript import opset18 as op

    if approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): FastGelu's pattern
        cube = op.Mul(op.Mul(op.Mul(x, x), x), op.CastLike(0.044715, x))
        inner = op.Mul(op.Add(x, cube), op.CastLike(math.sqrt(2 / math.pi), x))
        return op.Mul(op.Mul(x, op.CastLike(0.5, x)), op.Add(op.Tanh(inner), op.CastLike(1.0, x)))
    erf = op.Erf(op.Div(x, op.CastLike(math.sqrt(2.0), x)))
    return op.Mul(op.Mul(x, op.Add(erf, op.CastLike(1.0, x))), op.CastLike(0.5, x))


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, int, int], cfg: OnnxExportConfig,
                output_names: list[str] | None = None, translations: dict | None = None,
                input_name: str = "input", dims: dict[int, Any] | None = None) -> Path:
    """Write ``model`` (eval mode, fp32, CPU) to ``path``; the batch axis is dynamic if asked.
    A model with several outputs (a tuple) names each in ``output_names``. Custom ops translate
    by the registered translations (``export.hooks``: effvision::qdq -> QuantizeLinear/
    DequantizeLinear) and ``translations``. ``dims`` replaces the dynamic axes the config asks for
    (axis -> torch.export.Dim), for inputs whose sizes are free in other ways."""
    from .hooks import onnx_translations

    if not MIN_OPSET <= cfg.opset <= MAX_OPSET:
        raise EffVisionError(f"opset {cfg.opset} is outside the supported range {MIN_OPSET}..{MAX_OPSET}")
    path = Path(path)
    model = model.eval().float().cpu()
    dims = dims if dims is not None else _dims(cfg, input_shape)
    example = torch.randn(2 if 0 in dims else 1, *input_shape)  # batch 1 is what a static graph takes
    dynamic = (dims,) if dims else None
    log = io.StringIO()
    # The exporter prints progress to stdout; keep the CLI's output to what the user asked for.
    with warnings.catch_warnings(), contextlib.redirect_stdout(log):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=cfg.opset,
                                        input_names=[input_name], output_names=output_names or ["logits"],
                                        dynamic_shapes=dynamic, external_data=False, verbose=False,
                                        custom_translation_table={torch.ops.aten.gelu.default: _gelu_onnx,
                                                                  **onnx_translations(cfg.opset),
                                                                  **(translations or {})})
        except Exception as e:  # the exporter raises many types; the user needs the first line
            root = e.__cause__ or e
            if cfg.dynamic_hw:
                raise EffVisionError(f"ONNX export with dynamic height/width failed ({type(model).__name__} may only "
                                     f"run at a fixed size; ViTs need dynamic_img_size=True): "
                                     f"{str(root).strip().splitlines()[0]}") from e
            raise EffVisionError(f"ONNX export failed: {type(root).__name__}: {str(root).strip().splitlines()[0]}") from e
    tmp = path.with_name(path.name + ".tmp")
    program.save(str(tmp))
    tmp.replace(path)
    return path


def _dims(cfg: OnnxExportConfig, input_shape: tuple[int, int, int]) -> dict[int, Any]:
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=4096)} if cfg.dynamic_batch else {}
    if cfg.dynamic_hw:
        m = cfg.hw_multiple
        if input_shape[1] % m or input_shape[2] % m:
            raise EffVisionError(f"dynamic height/width: the export size {input_shape[1]}x{input_shape[2]} is not a "
                                 f"multiple of {m}")
        # Sizes stay multiples of the backbone's stride: H = m * h (torch.export derived dims).
        dims[2] = m * torch.export.Dim("height_blocks", min=1, max=8192 // m)
        dims[3] = m * torch.export.Dim("width_blocks", min=1, max=8192 // m)
    return dims


def check_parity(model: nn.Module, onnx_path: str | Path, input_shape: tuple[int, int, int],
                 batch_sizes: list[int], atol: float, seed: int = 0,
                 sizes: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Max abs error of onnxruntime vs PyTorch (fp32, CPU) at each batch size (and each (H, W)
    of ``sizes``, default the export size); raises above atol."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model = model.eval().float().cpu()
    g = torch.Generator().manual_seed(seed)
    fixed = session.get_inputs()[0].shape[0]
    if isinstance(fixed, int):  # a static batch axis runs at its own size only
        batch_sizes = [fixed]
    errors: dict[Any, float] = {}
    runs = [(b, hw) for hw in (sizes or [tuple(input_shape[1:])]) for b in batch_sizes]
    for b, hw in runs:
        x = torch.randn(b, input_shape[0], *hw, generator=g)
        with torch.no_grad():
            refs = model(x)
        refs = refs if isinstance(refs, (tuple, list)) else (refs,)  # several outputs: compare each
        try:
            outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        except Exception as e:  # onnxruntime's own error types: a graph fixed to another size, say
            raise ParityError(f"onnxruntime cannot run the exported graph at batch {b}, size {hw[0]}x{hw[1]}: "
                              f"{str(e).strip().splitlines()[0][:200]}") from e
        errors[b] = errors.get(b, 0.0)
        for ref, out in zip((r.numpy() for r in refs), outs):
            if out.shape != ref.shape:
                raise ParityError(f"onnxruntime output shape {out.shape} != PyTorch {ref.shape} at batch {b}, "
                                  f"size {hw[0]}x{hw[1]}")
            errors[b] = max(errors[b], float(np.abs(out - ref).max()))
    worst = max(errors.values())
    if not worst <= atol:
        raise ParityError(f"ONNX parity failed: max abs error {worst:.3g} > {atol:g} (per batch size: {errors})")
    return {"max_abs_error": worst, "per_batch": errors, "atol": atol, "onnxruntime": ort.__version__}
