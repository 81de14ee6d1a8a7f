"""onnxruntime CPU throughput of several models, timed round-robin in one process so that load
from other jobs on the machine hits all of them alike; prints img/s medians and each model's
ratio to the first. Targets are what `effvision bench` takes (a model dir, run dir or .onnx).
The table is filed in the results ledger (section ort-roundrobin, every round's img/s) unless
--no-ledger.

    .venv/bin/python scripts/ort_roundrobin.py DENSE_MODEL_DIR COMPRESSED.onnx [--rounds 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from effvision.bench import resolve_target, roundrobin
from effvision.benchmarks.ledger import add_arguments, record
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
    add_arguments(p)
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
    if not args.no_ledger:
        table = [{"target": r["target"], "batch": args.batch_size, "img/s (median)": r["median_img_per_s"],
                  "spread (min-max) img/s": f"{min(rates[r['target']]):,.1f}-{max(rates[r['target']]):,.1f}",
                  "vs first": r["ratio_vs_first"], "rounds": args.rounds} for r in rows]
        raw = {"batch_size": args.batch_size, "threads": args.threads, "iters": args.iters, "img_per_s_per_round": rates}
        command = shlex.join(["python", "scripts/ort_roundrobin.py", *sys.argv[1:]])
        path = record("ort-roundrobin", table, raw, command, "scripts/ort_roundrobin.py", args.ledger_dir)
        print(f"ledger: {path}", file=sys.stderr)  # stdout stays one JSON document


if __name__ == "__main__":
    main()
