"""onnxruntime CPU throughput of several models, timed round-robin in one process so that load
from other jobs on the machine hits all of them alike; prints img/s medians and each model's
ratio to the first. Targets are what `effvision bench` takes (a model dir, run dir or .onnx).

    .venv/bin/python scripts/ort_roundrobin.py DENSE_MODEL_DIR COMPRESSED.onnx [--rounds 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from effvision.bench import resolve_target, roundrobin
from effvision.export import OnnxExportConfig, export_onnx
from effvision.models.io import load_model


def as_onnx(target: str, workdir: Path) -> str:
    """The target's ONNX file; a model dir is exported once here, not once per round."""
    kind, model_dir, onnx_path = resolve_target(target)
    if onnx_path is not None:
        return str(onnx_path)
    if model_dir is None:
        raise SystemExit(f"{target}: give a model dir, run dir or .onnx file")
    model, spec = load_model(model_dir)
    out = workdir / f"{len(list(workdir.iterdir()))}.onnx"
    return str(export_onnx(model, out, (spec.in_chans, spec.img_size, spec.img_size), OnnxExportConfig()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("targets", nargs="+")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    workdir = tempfile.TemporaryDirectory()
    files = {t: as_onnx(t, Path(workdir.name)) for t in args.targets}
    by_file = roundrobin(list(files.values()), "ort", args.rounds, batch_size=args.batch_size, warmup=5,
                         iters=args.iters, threads=args.threads)
    rates = {t: by_file[f] for t, f in files.items()}
    workdir.cleanup()
    base = statistics.median(rates[args.targets[0]])
    rows = [{"target": t, "median_img_per_s": statistics.median(v), "ratio_vs_first": statistics.median(v) / base,
             "per_round": [round(x, 1) for x in v]} for t, v in rates.items()]
    print(json.dumps({"batch_size": args.batch_size, "threads": args.threads, "rounds": args.rounds, "rows": rows},
                     indent=2))


if __name__ == "__main__":
    main()
