"""Early exit in onnxruntime: the multi-exit graph (every head's logits as outputs), and the
same network cut at its exits into segment graphs that a small runner chains at batch 1,
stopping at the first certain head. Both parity-checked against PyTorch."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import EffVisionError
from .early_exit import _embed, exit_logits

__all__ = ["export_early_exit", "OrtEarlyExit", "ort_batch1_latency"]

MANIFEST = "early_exit.json"


class _MultiExit(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(exit_logits(self.model, x))


class _Segment(nn.Module):
    """Blocks [start, stop) of ``model``: from the image (first) or the tokens; to (tokens, exit
    logits), or to the final logits (last)."""

    def __init__(self, model: nn.Module, start: int, stop: int, head: nn.Module | None) -> None:
        super().__init__()
        self.model, self.start, self.stop, self.head = model, start, stop, head

    def forward(self, x: torch.Tensor) -> Any:
        tokens = _embed(self.model, x) if self.start == 0 else x  # (B, N, D)
        for block in self.model.blocks[self.start:self.stop]:
            tokens = block(tokens)
        if self.head is None:
            return self.model.forward_head(self.model.norm(tokens))
        return tokens, self.head(tokens)


def export_early_exit(model: nn.Module, out_dir: str | Path, input_shape: tuple[int, int, int], threshold: float,
                      criterion: str, opset: int = 18) -> dict[str, Any]:
    """``out_dir``/model.onnx (the plain model), multi_exit.onnx, segment_K.onnx and
    early_exit.json (the runner's manifest)."""
    from effvision.export.onnx import OnnxExportConfig, check_parity, export_onnx

    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists():
        raise EffVisionError(f"{out_dir / MANIFEST} exists already; choose another folder (nothing was overwritten)")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().float().cpu()
    cfg = OnnxExportConfig(opset=opset)
    names = [f"exit{i}" for i in model.exit_after] + ["logits"]
    export_onnx(model, out_dir / "model.onnx", input_shape, cfg)  # the plain model: the full-depth baseline
    export_onnx(_MultiExit(model), out_dir / "multi_exit.onnx", input_shape, cfg, output_names=names)
    parity = {"model": check_parity(model, out_dir / "model.onnx", input_shape, [1, 4], cfg.atol)["max_abs_error"],
              "multi_exit": check_parity(_MultiExit(model), out_dir / "multi_exit.onnx", input_shape, [1, 4],
                                         cfg.atol)["max_abs_error"]}
    bounds = [0] + [i + 1 for i in model.exit_after] + [len(model.blocks)]
    heads = list(model.exit_heads) + [None]
    segments, shape = [], input_shape
    with torch.no_grad():
        probe = torch.zeros(1, *input_shape)
        for k, (start, stop, head) in enumerate(zip(bounds[:-1], bounds[1:], heads)):
            seg = _Segment(model, start, stop, head).eval()
            path = out_dir / f"segment_{k}.onnx"
            export_onnx(seg, path, shape, cfg, output_names=["tokens", "logits"] if head is not None else ["logits"])
            parity[path.name] = check_parity(seg, path, shape, [1, 4], cfg.atol)["max_abs_error"]
            segments.append({"file": path.name, "blocks": [start, stop], "exit": head is not None})
            if head is not None:
                probe, _ = seg(probe)
                shape = tuple(probe.shape[1:])  # (N, D): the next segment's input
    manifest = {"threshold": threshold, "criterion": criterion, "depth": len(model.blocks),
                "exits_after": list(model.exit_after), "segments": segments, "multi_exit": "multi_exit.onnx",
                "outputs": names, "parity_max_abs_error": parity}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _certainty(logits: np.ndarray, criterion: str) -> float:
    z = logits[0].astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    if criterion == "confidence":
        return float(p.max())
    return float(1.0 - -(p * np.log(np.clip(p, 1e-12, None))).sum() / np.log(len(p)))


class OrtEarlyExit:
    """Batch-1 onnxruntime runner over the segment graphs: ``runner(x)`` -> (logits, blocks run)."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        folder = Path(folder)
        self.manifest = json.loads((folder / MANIFEST).read_text())
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions = [ort.InferenceSession(str(folder / s["file"]), opts, providers=["CPUExecutionProvider"])
                         for s in self.manifest["segments"]]
        self.threshold, self.criterion = self.manifest["threshold"], self.manifest["criterion"]

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        if x.shape[0] != 1:
            raise EffVisionError(f"the early-exit runner stops per image: batch 1, got {x.shape[0]}")
        feed = x
        for session, seg in zip(self.sessions, self.manifest["segments"]):
            outs = session.run(None, {session.get_inputs()[0].name: feed})
            if not seg["exit"]:
                return outs[0], seg["blocks"][1]
            feed, logits = outs
            if _certainty(logits, self.criterion) >= self.threshold:
                return logits, seg["blocks"][1]
        raise AssertionError("the last segment always answers")


def ort_batch1_latency(folder: str | Path, images: np.ndarray, threads: int | None = None) -> dict[str, Any]:
    """Per-image latency in onnxruntime: the plain model.onnx and the runner alternating image by
    image (the same load on both), medians in ms; and the fraction of blocks the runner ran."""
    import statistics
    import time

    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    full = ort.InferenceSession(str(Path(folder) / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    runner = OrtEarlyExit(folder, threads)
    name = full.get_inputs()[0].name
    for x in images[:3]:  # warm-up
        full.run(None, {name: x[None]}), runner(x[None])
    t_full, t_early, blocks = [], [], []
    for x in images:
        t = time.perf_counter()
        full.run(None, {name: x[None]})
        t_full.append(time.perf_counter() - t)
        t = time.perf_counter()
        _, run = runner(x[None])
        t_early.append(time.perf_counter() - t)
        blocks.append(run)
    f, e = statistics.median(t_full) * 1e3, statistics.median(t_early) * 1e3
    return {"images": len(images), "full_ms_p50": f, "early_exit_ms_p50": e, "speedup": f / e,
            "blocks_fraction": float(np.mean(blocks)) / runner.manifest["depth"]}
