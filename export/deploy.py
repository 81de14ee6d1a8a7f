"""Deployable ONNX for every precision: fp32, fp16, int8 QDQ and fp8 QDQ (from a model that
effvision.compress.quantize calibrated: its quantization read through ``export.hooks``), with parity in onnxruntime, an onnxslim pass with a
second parity check, the TensorRT compatibility check, and a manifest with checksums.

Every check runs on files in a temporary folder; only a graph that passed them all is moved
to the output folder, so bad input leaves nothing behind."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn

from effvision.errors import EffVisionError
from effvision.models.io import load_model, read_spec

from .hooks import float_view, quantization_of

from .manifest import classifier_io, write_manifest
from .onnx import OnnxExportConfig, ParityError, export_onnx
from .tensorrt_check import raise_if_incompatible
from .tensorrt_parser import CHECK_METHODS, require_tensorrt, run_tensorrt_check

__all__ = ["DeployConfig", "export_deployable", "PRECISIONS", "TARGET_PLATFORMS"]

PRECISIONS = ("auto", "fp32", "fp16")
# target -> (QDQ form, platform for the TensorRT check or None)
TARGET_PLATFORMS = {"tensorrt": "tensorrt10", "jetpack5": "jetpack5", "ort-cpu": None}
FP8_MIN_OPSET = 19  # QuantizeLinear/DequantizeLinear take float8 from opset 19


@dataclass
class DeployConfig:
    opset: int = 18
    target: str = "tensorrt"               # tensorrt | jetpack5 | ort-cpu
    precision: str = "auto"                # auto: the model's (int8/fp8 if quantized, else fp32) | fp32 | fp16
    dynamic_batch: bool = True
    slim: bool = True                      # onnxslim pass, kept only if it passes parity too
    parity_batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    atol: float = 1e-4                     # fp32 tolerance; lower precisions use rel_tol
    # max abs error / max |logit|. QDQ: onnxruntime's QuantizeLinear and torch round the same
    # float differently in the last bit now and then, and a value on a rounding edge moves one
    # int8 step that later layers carry; ~2% measured on random-init ViTs (tiny logits).
    rel_tol: dict[str, float] = field(default_factory=lambda: {"fp16": 0.01, "int8": 0.05, "fp8": 0.05})
    tensorrt_check: str = "auto"           # auto: TensorRT's parser where it runs, else the offline list | parser | offline
    # target ort-cpu only (ort_optimize.py; figures in the README): onnxruntime's transformer
    # optimizer on the fp32 graph (opt-in: not faster on deit_tiny at batch 32), and the INT8
    # form: dynamic (onnxruntime's quantize_dynamic of the exported graph, measured fastest at
    # batch 32 with the best agreement) or qdq (the calibrated QDQ graph; OpenVINO reads it)
    ort_optimize: bool = False
    ort_int8_form: str = "dynamic"
    # with ort_optimize, one com.microsoft.Attention per block (ort_attention.py): fastest at
    # batch 1 on deit_tiny, not at batch 32, slower on the quickstart ViT (README), so opt-in
    ort_fused_attention: bool = False
    int8_min_sqnr_db: float = 15.0         # ort-dynamic INT8 vs fp32 logits: a broken graph is ~0 dB


def _precision(model_dir: Path, cfg: DeployConfig) -> tuple[str, dict | None]:
    quant = quantization_of(read_spec(model_dir))
    if cfg.precision not in PRECISIONS:
        raise EffVisionError(f"unknown precision '{cfg.precision}' (available: {', '.join(PRECISIONS)})")
    if cfg.target not in TARGET_PLATFORMS:
        raise EffVisionError(f"unknown target '{cfg.target}' (available: {', '.join(TARGET_PLATFORMS)})")
    if quant is None or not quant["modules"]:  # int8_layers: measured may return every layer to float
        return ("fp32" if cfg.precision == "auto" else cfg.precision), quant
    if cfg.precision != "auto":
        raise EffVisionError(f"{model_dir} is quantized ({quant['precision']}); export it with precision auto, "
                             f"or export the float model before the quantize stage for {cfg.precision}")
    return quant["precision"], quant


def preflight(model_dir: Path, out_dir: Path, cfg: DeployConfig) -> tuple[str, dict | None]:
    """Checks that need no export: every one raises before anything is written."""
    precision, quant = _precision(model_dir, cfg)
    if (out_dir / "model.onnx").exists():
        raise EffVisionError(f"{out_dir / 'model.onnx'} exists already; choose another --out (nothing was overwritten)")
    if precision == "fp8" and cfg.opset < FP8_MIN_OPSET:
        raise EffVisionError(f"opset {cfg.opset} is too low for FP8 QDQ (QuantizeLinear takes float8 from opset "
                             f"{FP8_MIN_OPSET}; TensorRT 10 reads up to 20)")
    if precision == "fp8" and cfg.target != "tensorrt":
        raise EffVisionError(f"FP8 runs on TensorRT (Hopper-class GPUs), not target '{cfg.target}'")
    if cfg.tensorrt_check not in CHECK_METHODS:
        raise EffVisionError(f"unknown TensorRT check '{cfg.tensorrt_check}' (available: {', '.join(CHECK_METHODS)})")
    if cfg.tensorrt_check == "parser":
        if TARGET_PLATFORMS[cfg.target] is None:
            raise EffVisionError(f"--trt-check parser: target '{cfg.target}' is not a TensorRT target")
        require_tensorrt("--trt-check parser")
    if (cfg.ort_optimize or cfg.ort_fused_attention) and cfg.target != "ort-cpu":
        raise EffVisionError(f"ort_optimize writes onnxruntime contrib ops: it needs target ort-cpu, not '{cfg.target}'")
    if cfg.ort_int8_form not in ("dynamic", "qdq"):
        raise EffVisionError(f"unknown ort_int8_form '{cfg.ort_int8_form}' (available: dynamic, qdq)")
    if cfg.target == "jetpack5" and cfg.opset > 17:
        raise EffVisionError(f"target jetpack5 (TensorRT 8.5) reads opset <= 17, not {cfg.opset}")
    if quant is not None and (quant["target"] == "ort-cpu") != (cfg.target == "ort-cpu"):
        raise EffVisionError(f"{model_dir} was quantized for target '{quant['target']}' (its QDQ form); "
                             f"export it with --target {quant['target']} or quantize again for '{cfg.target}'")
    return precision, quant


def _session(path: Path, optimize: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types; its message names the node
        raise EffVisionError(f"onnxruntime cannot run the exported graph: {str(e).strip().splitlines()[0]}") from e


def _compare(model: nn.Module, session, shape: tuple[int, ...], sizes: list[int]) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    errs, rels, agree, n = {}, {}, 0, 0
    for b in sizes:
        x = torch.randn(b, *shape, generator=g)
        with torch.no_grad():
            ref = model(x).float().numpy()
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].astype(np.float32)
        errs[b] = float(np.abs(out - ref).max())
        rels[b] = errs[b] / max(float(np.abs(ref).max()), 1e-12)
        agree += int((out.argmax(1) == ref.argmax(1)).sum())
        n += b
    return {"max_abs_error": max(errs.values()), "max_rel_error": max(rels.values()), "top1_agreement": agree / n,
            "per_batch": errs}


def parity(model: nn.Module, path: Path, shape: tuple[int, ...], cfg: DeployConfig, precision: str) -> dict[str, Any]:
    """onnxruntime vs the PyTorch (fake-quant) model. fp32/fp16: the optimised session must match.
    QDQ: the graph as written (no graph optimisations: QuantizeLinear/DequantizeLinear run as
    specified) must match; the optimised session, where onnxruntime fuses QDQ into integer
    kernels that round at other points, is measured and reported."""
    session = _session(path, optimize=precision in ("fp32", "fp16"))
    fixed = session.get_inputs()[0].shape[0]
    sizes = [fixed] if isinstance(fixed, int) else cfg.parity_batch_sizes
    result = _compare(model, session, shape, sizes)
    tol = cfg.atol if precision == "fp32" else cfg.rel_tol[precision]
    worst = result["max_abs_error"] if precision == "fp32" else result["max_rel_error"]
    result["tolerance"] = {"abs" if precision == "fp32" else "rel": tol}
    if not worst <= tol:
        raise ParityError(f"ONNX parity failed for {path.name}: max abs error {result['max_abs_error']:.3g} "
                          f"(relative {result['max_rel_error']:.3g}) beyond the {precision} tolerance {tol:g}")
    if precision in ("int8", "fp8"):
        result["optimized_session"] = _compare(model, _session(path), shape, sizes)
    return result


def _to_fp16(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # fp32 inputs/outputs keep the interface of the fp32 model; the body runs in fp16
    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))


def _slim(src: Path, dst: Path) -> None:
    import onnxslim

    onnx.save(onnxslim.slim(onnx.load(str(src))), str(dst))


def _opset(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def _float_copy_ok(model: nn.Module, quant: dict | None) -> bool:
    """The ort-dynamic INT8 form quantizes every MatMul; a model that kept Linear layers in float
    (accuracy_budget fallback, int8_layers: measured, exclude) keeps its QDQ form instead."""
    quantized = set(quant["modules"]) if quant else set()
    return all(name in quantized for name, m in model.named_modules() if isinstance(m, nn.Linear))


def _int8_check(reference: nn.Module, path: Path, shape: tuple[int, ...], cfg: DeployConfig) -> dict[str, Any]:
    """ort-dynamic INT8 vs the float model: logit SQNR and top-1 agreement on random inputs (the
    accuracy on real data is the eval stage's and the README's figure)."""
    session = _session(path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, *shape, generator=g)
    with torch.no_grad():
        ref = reference(x).float().numpy()
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    sqnr = float(10 * np.log10((ref ** 2).mean() / max(float(((out - ref) ** 2).mean()), 1e-30)))
    result = {"sqnr_db_vs_fp32": sqnr, "top1_agreement_vs_fp32": float((out.argmax(1) == ref.argmax(1)).mean()),
              "max_abs_error": float(np.abs(out - ref).max()), "images": len(x), "min_sqnr_db": cfg.int8_min_sqnr_db}
    if not sqnr >= cfg.int8_min_sqnr_db:
        raise ParityError(f"INT8 check failed for {path.name}: logit SQNR vs fp32 {sqnr:.1f} dB < "
                          f"{cfg.int8_min_sqnr_db:g} dB")
    return result


def _ort_graph(model: nn.Module, tmp: Path, shape: tuple[int, ...], cfg: DeployConfig, int8: bool
               ) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The ort-cpu graph of a float ``model``: export (opt-in fused Attention), onnxslim, opt-in
    onnxruntime's transformer optimizer (each pass kept only if fp32 parity still holds), then
    for INT8 dynamic quantization of that graph with its own check. Returns (file, checks,
    record for the manifest)."""
    from .ort_attention import attention_translations, fused_attention
    from .ort_optimize import quantize_dynamic_int8, transformer_optimize

    with fused_attention(model) if cfg.ort_optimize and cfg.ort_fused_attention else contextlib.nullcontext(0) as fused:
        final = export_onnx(model, tmp / "raw.onnx", shape,
                            OnnxExportConfig(opset=cfg.opset, dynamic_batch=cfg.dynamic_batch),
                            translations=attention_translations())
    checks = {"export": parity(model, final, shape, cfg, "fp32")}  # vs timm's own forward
    record: dict[str, Any] = {"fused_attention_blocks": fused}
    passes = [("onnxslim", _slim)] if cfg.slim else []
    passes += [("ort_transformer_optimizer", transformer_optimize)] if cfg.ort_optimize else []
    for name, apply in passes:
        try:
            stats = apply(final, tmp / f"{name}.onnx")
            checks[name] = parity(model, tmp / f"{name}.onnx", shape, cfg, "fp32")
            final = tmp / f"{name}.onnx"
            if stats:
                record["fused_ops"] = stats
        except EffVisionError as e:  # keep the graph before this pass, say why
            checks[name] = {"kept": False, "reason": str(e)}
    if int8:
        try:
            record["int8"] = quantize_dynamic_int8(final, tmp / "int8.onnx")
        except Exception as e:  # onnxruntime's quantizer raises many types; the caller falls back to QDQ
            raise EffVisionError(f"onnxruntime's dynamic quantization failed: {str(e).strip().splitlines()[0]}") from e
        checks["int8"] = _int8_check(model, tmp / "int8.onnx", shape, cfg)
        final = tmp / "int8.onnx"
    return final, checks, record


def export_deployable(model_dir: str | Path, out_dir: str | Path, cfg: DeployConfig) -> dict[str, Any]:
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    precision, quant = preflight(model_dir, out_dir, cfg)
    model, spec = load_model(model_dir)
    model.eval()
    shape = (spec.in_chans, spec.img_size, spec.img_size)
    dynamic_int8 = cfg.target == "ort-cpu" and cfg.ort_int8_form == "dynamic" and precision == "int8"
    ort_form = (cfg.ort_optimize and precision == "fp32") or (dynamic_int8 and _float_copy_ok(model, quant))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fallback = None
        if ort_form:
            try:
                with float_view(model):  # int8: the float model; the graph is quantized by onnxruntime
                    final, checks, ort_record = _ort_graph(model, tmp, shape, cfg, precision == "int8")
            except EffVisionError as e:
                if precision != "int8":
                    raise
                fallback = str(e)  # the calibrated QDQ form below, with the reason on record
        if ort_form and fallback is None:
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.move(str(final), out_dir / "model.onnx")
            info = {"format": "onnx", "precision": precision, "target": cfg.target, "opset": cfg.opset,
                    "model": spec.name, "source": str(model_dir), "quantization": quant,
                    **classifier_io(spec, tuple(shape), cfg.dynamic_batch), "parity": checks,
                    "ort_cpu": ort_record}
            write_manifest(out_dir, ["model.onnx"], info)
            last = "int8" if precision == "int8" else next(k for k in reversed(checks) if checks[k].get("kept", True))
            slimmed = "onnxslim" in checks and checks["onnxslim"].get("kept", True)
            return {"onnx": str(out_dir / "model.onnx"), "precision": precision, "target": cfg.target,
                    "opset": cfg.opset, "model": spec.name, "slimmed": slimmed, "parity": checks[last],
                    "checks": checks, "ort_cpu": ort_record}
        raw = export_onnx(model, tmp / "raw.onnx", shape,
                          OnnxExportConfig(opset=cfg.opset, dynamic_batch=cfg.dynamic_batch))
        if _opset(raw) != cfg.opset:
            raise EffVisionError(f"the exporter could not write opset {cfg.opset} for this model (it kept "
                                 f"{_opset(raw)}); choose opset >= {_opset(raw)} or a target that reads it")
        if precision == "fp16":
            _to_fp16(raw, tmp / "fp16.onnx")
            raw = tmp / "fp16.onnx"
        platform = TARGET_PLATFORMS[cfg.target]
        trt_check = None
        if platform is not None:
            found, trt_check = run_tensorrt_check(raw, platform, cfg.tensorrt_check)
            raise_if_incompatible(found, f"{model_dir} ({precision}, opset {cfg.opset})")
        checks = {"export": parity(model, raw, shape, cfg, precision)}
        final = raw
        if cfg.slim:
            _slim(raw, tmp / "slim.onnx")
            try:
                checks["onnxslim"] = parity(model, tmp / "slim.onnx", shape, cfg, precision)
                if platform is not None:
                    raise_if_incompatible(run_tensorrt_check(tmp / "slim.onnx", platform, cfg.tensorrt_check)[0],
                                          "after onnxslim")
                final = tmp / "slim.onnx"
            except EffVisionError as e:  # keep the unslimmed graph, say why
                checks["onnxslim"] = {"kept": False, "reason": str(e)}
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(str(final), out_dir / "model.onnx")
    info = {
        "format": "onnx", "precision": precision, "target": cfg.target, "opset": cfg.opset, "model": spec.name,
        "source": str(model_dir), "quantization": quant,
        **classifier_io(spec, tuple(shape), cfg.dynamic_batch), "parity": checks,
    }
    if trt_check is not None:
        info["tensorrt_check"] = trt_check
    if dynamic_int8:
        info["ort_cpu"] = {"int8": {"form": "qdq", "reason": fallback or "layers kept in float: dynamic "
                                    "quantization would quantize every MatMul"}}
    write_manifest(out_dir, ["model.onnx"], info)
    kept = checks.get("onnxslim", {}).get("kept", True) and "onnxslim" in checks
    return {"onnx": str(out_dir / "model.onnx"), "precision": precision, "target": cfg.target,
            "opset": cfg.opset, "model": spec.name, "slimmed": kept,
            "parity": checks["onnxslim" if kept else "export"], "checks": checks}
