"""``int8_layers: measured``: keep a group of layers in INT8 only where the target runtime runs
it measurably faster than in float (INT8 ViTs that are slower than float on TensorRT are the
most common complaint in ModelOpt's tracker: small matmuls gain less than the Q/DQ costs).

Runtime-agnostic: a group (one transformer/CNN block's quantized Linear/Conv layers, or each
layer) is judged in context, leave-one-out: the whole model in INT8 against the same model
with only that group in float (its Q/DQ pairs dropped from one QDQ export), timed in the
runtime (TensorRT engines when TensorRT and a GPU are here, else onnxruntime on the CPU).
Calls alternate round-robin (order rotated each round; each entry the fastest of 3 calls) so
drift in machine load hits every variant alike. A group stays INT8 only where all-INT8 beat
"that group in float" in at least ``int8_min_wins`` of the rounds (a sign test: 12 of 15
rounds by chance alone has p = 0.018), so a group whose effect is lost in noise goes back to
float rather than flipping between reruns on a coin toss; the median paired ratio
t(group float) / t(all INT8), its quartiles and the wins are recorded. A relative margin on
the whole model's time would not do: a block that is a sixth of the model and twice as fast
in INT8 moves the total by under 10%. The chosen mix is then timed beside all-INT8 and
all-float by the same rule: it stands unless one of those beats it in int8_min_wins of the
rounds (groups interact: Q/DQ at a float/INT8 border costs time of its own).

The verdict turns float groups back into plain nn.Linear/nn.Conv2d (``unquantize_module``),
so the model's record, the PyTorch model and every later export agree, and parity checks still hold."""
from __future__ import annotations

import ast
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch.nn as nn
from tqdm import tqdm

from ...errors import ConfigError, EffVisionError
from .api import unquantize_module, update_quant_record
from .config import QuantConfig
from .fake_quant import quant_modules

__all__ = ["group_modules", "resolve_runtime", "measure_int8_layers_", "decide", "drop_qdq"]

_INDEX = re.compile(r"^\d+$")


def group_modules(names: list[str], by: str) -> dict[str, list[str]]:
    """``block``: the module name up to its last numeric part (``blocks.3.mlp.fc1`` -> ``blocks.3``,
    ``stages.1.blocks.0.conv`` -> ``stages.1.blocks.0``); names without one (``head``) stand
    alone. ``layer``: every module its own group. Sorted, so reruns see the same groups."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        parts = name.split(".")
        last = max((i for i, p in enumerate(parts) if _INDEX.match(p)), default=None)
        key = name if by == "layer" or last is None else ".".join(parts[: last + 1])
        groups.setdefault(key, []).append(name)
    return groups


def resolve_runtime(cfg: QuantConfig) -> str:
    """'tensorrt' or 'onnxruntime'; raises before any work when the asked runtime is missing."""
    from effvision.export.tensorrt_parser import TensorRTMissing
    from effvision.export.tensorrt_runtime import require_trt_cuda

    runtime = cfg.int8_runtime
    if runtime == "auto":
        runtime = "onnxruntime"
        if cfg.target == "tensorrt":
            try:
                require_trt_cuda("int8_layers: measured")
                runtime = "tensorrt"
            except TensorRTMissing:
                pass
    elif runtime == "tensorrt":
        require_trt_cuda("int8_runtime: tensorrt")
    if runtime == "onnxruntime" and cfg.precision == "fp8":
        raise ConfigError("int8_layers: measured with fp8 needs TensorRT (onnxruntime has no fast FP8 kernels)")
    return runtime


def decide(wins: dict[str, float], min_wins: float) -> dict[str, bool]:
    """INT8 for a group only where it was faster in at least ``min_wins`` of the rounds."""
    return {g: w >= min_wins for g, w in wins.items()}


def _runner(path: Path, runtime: str, x: np.ndarray) -> Callable[[], float]:
    """One timed call of the graph at ``path`` on ``x``; seconds."""
    if runtime == "tensorrt":
        from effvision.export.tensorrt_runtime import TrtEngine, serialize_engine

        engine = TrtEngine(serialize_engine(path, "input", x.shape[1:], (len(x),) * 3))
        return lambda: engine.time(x, 0, 1)[0]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])  # all optimisations: QDQ fused

    def call() -> float:
        t0 = time.perf_counter()
        session.run(None, {"input": x})
        return time.perf_counter() - t0

    return call


def _round_robin(calls: dict[str, Callable[[], float]], rounds: int, warmup: int, desc: str,
                 progress: bool) -> dict[str, list[float]]:
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in tqdm(range(rounds), desc=desc, disable=not progress, leave=False):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            times[name].append(min(calls[name]() for _ in range(3)))  # min of 3: drops spikes from other load
    return times


def _paired(times: dict[str, list[float]], num: str, den: str) -> tuple[float, list[float], float]:
    """Median of t(num)/t(den) over rounds, its quartiles, and the share of rounds den was faster."""
    ratios = [a / b for a, b in zip(times[num], times[den])]
    q = np.percentile(ratios, [25, 75])
    return statistics.median(ratios), [float(q[0]), float(q[1])], sum(r > 1.0 for r in ratios) / len(ratios)


def _owner(node: onnx.NodeProto) -> str | None:
    """The module whose quantizer emitted a Q/DQ node, from the exporter's name-scope metadata."""
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    for scope in ast.literal_eval(scopes) if scopes else []:
        for suffix in (".input_quantizer", ".weight_quantizer"):
            if scope.endswith(suffix):
                return scope[: -len(suffix)]
    return None


def drop_qdq(model: onnx.ModelProto, modules: set[str]) -> onnx.ModelProto:
    """A copy of the QDQ graph without the Q/DQ pairs of ``modules``' quantizers (their layers
    then run in float), dead scale computations pruned. Graph surgery on one export instead of
    one export per variant: exporting takes seconds, this milliseconds."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = list(m.graph.node)
    quants = {n.output[0]: n for n in nodes if n.op_type == "QuantizeLinear" and _owner(n) in modules}
    rename, dropped = {}, set()
    for n in nodes:
        if n.op_type == "DequantizeLinear" and n.input[0] in quants:
            q = quants[n.input[0]]
            rename[n.output[0]] = q.input[0]
            dropped |= {id(n), id(q)}
    found = {_owner(quants[k]) for k in quants}
    if found != modules or len(dropped) != 4 * len(modules):  # input and weight Q/DQ pair per layer
        raise EffVisionError(f"int8_layers: measured: the exported graph does not name the Q/DQ nodes of "
                             f"{sorted(modules - found) or sorted(modules)} (exporter metadata missing?)")
    if rename.keys() & {o.name for o in m.graph.output}:
        raise EffVisionError("int8_layers: measured: a Q/DQ pair ends the graph; cannot drop it")
    kept = [n for n in nodes if id(n) not in dropped]
    for n in kept:
        for k, name in enumerate(n.input):
            n.input[k] = rename.get(name, name)
    while True:  # prune nodes nothing reads any more (the dropped pairs' scale arithmetic)
        used = {i for n in kept for i in n.input} | {o.name for o in m.graph.output}
        alive = [n for n in kept if any(o in used for o in n.output)]
        if len(alive) == len(kept):
            break
        kept = alive
    del m.graph.node[:]
    m.graph.node.extend(kept)
    used = {i for n in kept for i in n.input}
    inits = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    return m


def measure_int8_layers_(model: nn.Module, cfg: QuantConfig, input_shape: tuple[int, int, int],
                         runtime: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure each group, return float groups to float in place; returns the measurement, which
    the model's ``quantize`` record keeps as ``int8_layers`` (with the modules still quantized)."""
    from effvision.export import OnnxExportConfig, export_onnx

    from .qdq_op import onnx_translations

    runtime = runtime or resolve_runtime(cfg)
    mods = quant_modules(model)
    if not mods:
        raise EffVisionError("int8_layers: measured: the model has no quantized layers")
    groups = group_modules(list(mods), cfg.int8_groups)
    opset = 19 if cfg.precision == "fp8" else 18
    x = np.random.default_rng(0).standard_normal((cfg.int8_batch_size, *input_shape), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        full = onnx.load(str(export_onnx(model, tmp / "int8.onnx", input_shape, OnnxExportConfig(opset=opset),
                                         translations=onnx_translations(opset))))

        def runner(float_groups: set[str], name: str) -> Callable[[], float]:
            path = tmp / f"{name}.onnx"
            onnx.save(drop_qdq(full, {n for g in float_groups for n in groups[g]}), str(path))
            return _runner(path, runtime, x)

        calls = {"all_int8": runner(set(), "v"), **{f"float:{g}": runner({g}, f"v{i}") for i, g in enumerate(groups)}}
        times = _round_robin(calls, cfg.int8_rounds, 2, "int8 groups", progress)
        speedups = {g: _paired(times, f"float:{g}", "all_int8") for g in groups}
        keep = decide({g: w for g, (_, _, w) in speedups.items()}, cfg.int8_min_wins)
        float_groups = {g for g, k in keep.items() if not k}
        # the chosen mix beside all-INT8 and all-float, timed anew
        final_calls = {"all_int8": calls["all_int8"], "all_float": runner(set(groups), "float")}
        if float_groups and float_groups != set(groups):
            final_calls["measured"] = runner(float_groups, "mixed")
        chosen = "all_int8" if not float_groups else "all_float" if float_groups == set(groups) else "measured"
        final_times = _round_robin(final_calls, cfg.int8_rounds, 2, "int8 groups: final", progress)
        for other in final_calls:
            if other != chosen and _paired(final_times, chosen, other)[2] >= cfg.int8_min_wins:
                chosen = other  # interactions between groups: that mix is measurably faster
        float_groups = {"all_int8": set(), "all_float": set(groups)}.get(chosen, float_groups)
    for g in float_groups:
        for n in groups[g]:
            unquantize_module(mods[n])
    measured = {
        "mode": "measured", "runtime": _runtime_name(runtime), "target": cfg.target,
        **({"note": "measured in onnxruntime on the CPU, not in TensorRT (not available here)"}
           if runtime == "onnxruntime" and cfg.target == "tensorrt" else {}),
        "batch_size": cfg.int8_batch_size, "rounds": cfg.int8_rounds, "min_wins": cfg.int8_min_wins,
        "grouping": cfg.int8_groups,
        "groups": {g: {"modules": groups[g], "int8_speedup": speedups[g][0], "int8_speedup_quartiles": speedups[g][1],
                       "int8_wins": speedups[g][2],
                       "int8": g not in float_groups} for g in groups},
        "final": {"chosen": chosen, **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in final_times.items()}},
    }
    update_quant_record(model, int8_layers=measured)
    return measured


def _runtime_name(runtime: str) -> str:
    if runtime == "tensorrt":
        import tensorrt

        return f"tensorrt {tensorrt.__version__}"
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} CPU"
