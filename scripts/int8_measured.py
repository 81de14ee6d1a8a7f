"""``int8_layers: measured`` on this CPU: which blocks onnxruntime runs faster in INT8, run twice
from scratch to show whether the verdicts repeat, with the final all-INT8 / chosen / all-float
timings of each run.

Each run: the model (random init, seed 0; speed does not depend on the weights) is quantized
(INT8 PTQ, ort-cpu target, calibrated on random images), then measure_int8_layers_ times
every block leave-one-out, round-robin, in onnxruntime. Both tables are filed in the results
ledger (sections int8-measured: per block; int8-measured-final: per run) unless --no-ledger.

    .venv/bin/python scripts/int8_measured.py [--model vit_micro_patch4_32] [--img-size 32]
        [--runs 2] [--rounds 15] [--batch-size 8] [--min-wins 0.8] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch

import effvision.models  # noqa: F401  (registers effvision's models)
from effvision.benchmarks.ledger import add_arguments, record
from effvision.runinfo import cpu_name
from effvision.compress.quantize import QuantConfig, quantize_
from effvision.compress.quantize.measured import measure_int8_layers_
from effvision.models.io import ModelSpec, create_model


def one_run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = create_model(ModelSpec(name=args.model, num_classes=10, img_size=args.img_size)).eval()
    x = torch.randn(32, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig(target="ort-cpu", calib_batches=2, min_calib_samples=16, int8_layers="measured",
                      int8_rounds=args.rounds, int8_batch_size=args.batch_size, int8_min_wins=args.min_wins)
    quantize_(model, cfg, [(x[:16], None), (x[16:], None)], progress=False)
    return measure_int8_layers_(model, cfg, (3, args.img_size, args.img_size))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_micro_patch4_32")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-wins", type=float, default=0.8)
    p.add_argument("--json")
    add_arguments(p)
    args = p.parse_args()
    runs = [one_run(args) for _ in range(args.runs)]
    print(f"{args.model}, batch {args.batch_size}, {args.rounds} rounds, min wins {args.min_wins}, {cpu_name()}, "
          f"{torch.get_num_threads()} threads")
    groups = list(runs[0]["groups"])
    print("| block | " + " | ".join(f"run {i + 1}: INT8 speedup (quartiles), wins -> kept" for i in range(len(runs))) + " |")
    print("|---|" + "---|" * len(runs))
    for g in groups:
        cells = [f"{r['groups'][g]['int8_speedup']:.2f} ({r['groups'][g]['int8_speedup_quartiles'][0]:.2f}-"
                 f"{r['groups'][g]['int8_speedup_quartiles'][1]:.2f}), {r['groups'][g]['int8_wins']:.0%} -> {'INT8' if r['groups'][g]['int8'] else 'float'}"
                 for r in runs]
        print(f"| {g} | " + " | ".join(cells) + " |")
    for i, r in enumerate(runs):
        f = r["final"]
        print(f"run {i + 1}: chosen {f['chosen']}; " + ", ".join(f"{k[:-3]} {v:.2f} ms" for k, v in f.items() if k.endswith("_ms")))
    same = all(r["groups"][g]["int8"] == runs[0]["groups"][g]["int8"] for r in runs for g in groups)
    print(f"verdicts identical across runs: {same}")
    if args.json:
        with open(args.json, "w") as fh:
            # default=str: --ledger-dir is a Path
            json.dump({"args": vars(args), "cpu": cpu_name(), "runs": runs}, fh, indent=2, default=str)
    if not args.no_ledger:
        blocks = [{"run": i + 1, "block": g, "INT8 speedup (median)": r["groups"][g]["int8_speedup"],
                   "quartiles": "{:.2f}-{:.2f}".format(*r["groups"][g]["int8_speedup_quartiles"]),
                   "INT8 wins": r["groups"][g]["int8_wins"], "kept": "INT8" if r["groups"][g]["int8"] else "float",
                   "rounds": args.rounds} for i, r in enumerate(runs) for g in groups]
        final = [{"run": i + 1, "chosen": r["final"]["chosen"], "all INT8 ms (median)": r["final"]["all_int8_ms"],
                  "measured mix ms (median)": r["final"].get("measured_ms"),
                  "all float ms (median)": r["final"]["all_float_ms"], "rounds": args.rounds} for i, r in enumerate(runs)]
        raw = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "runs": runs}
        command = shlex.join(["python", "scripts/int8_measured.py", *sys.argv[1:]])
        for section, table in (("int8-measured", blocks), ("int8-measured-final", final)):
            print(f"ledger: {record(section, table, raw, command, 'scripts/int8_measured.py', args.ledger_dir)}")


if __name__ == "__main__":
    main()
