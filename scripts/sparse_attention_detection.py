"""Detection mAP against attention density: a ViTDet FCOS detector on COCO128 at a high token count
(vit_micro_patch4_32 at 128x128 = 1,025 tokens), trained once by an effvision recipe, then its
backbone's attention profiled on COCO128 images and swapped for per-head policies at kept mass
1.0 / 0.99 / 0.95 / 0.9 (--recoveries), without fine-tuning; COCO mAP of each (pycocotools; COCO128 is a pipeline
check: the detector is trained and evaluated on the same 128 images). Table on stdout, JSON and
plot in --out (density-b<block>.json; map_vs_density.png over every block size run there); a rerun
reuses the trained detector. The table is filed in the results ledger (section
sparse-attention-detection) unless --no-ledger.

  .venv/bin/python scripts/sparse_attention_detection.py --init runs/cpu_bench/dense/01-train/model \
      --out runs/sparse_attention_detection [--epochs 40] [--size 128] [--block 64] [--recoveries 1 0.9 0.8]
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import matplotlib
import torch
import yaml

from effvision.attention import SparseAttentionConfig, density_report
from effvision.benchmarks.ledger import add_arguments, record
from effvision.data.coco import CocoDataConfig, coco_samples
from effvision.detection.evaluate import evaluate_coco
from effvision.detection.io import load_detector
from effvision.detection.sparse_attention import sparsify_detector_

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def train(args: argparse.Namespace, out: Path) -> Path:
    """The detector dir of an effvision run (reused when finished)."""
    data = {"root": str(args.coco), "batch_size": 8}
    recipe = {"name": "sparse_attention_detection", "seed": 0, "device": "cpu", "threads": args.threads,
              "model": {"name": "vit_micro_patch4_32", "kwargs": {}, **({"init_from": str(args.init)} if args.init else {})},
              "stages": [{"type": "train_detection", "detector": "fcos", "out_channels": 64, "data": data,
                          "min_size": args.size, "max_size": args.size, "fixed_size": [args.size, args.size],
                          "epochs": args.epochs, "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4},
                          "warmup_steps": 50, "grad_clip": 10.0, "log_every": 16}]}
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    cmd = [sys.executable, "-m", "effvision", "run", str(path), "--out", str(out / "run"), "--resume"]
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise SystemExit(f"training failed: {' '.join(cmd)}")
    return out / "run" / "01-train_detection" / "detector"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", type=Path, default=None, help="classifier model dir for the backbone (else random init)")
    ap.add_argument("--coco", type=Path, default=ROOT.parent / "shared" / "datasets" / "coco128")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--calib-batches", type=int, default=2)
    ap.add_argument("--recoveries", type=float, nargs="+", default=[1.0, 0.99, 0.95, 0.9],
                    help="kept attention mass per variant (1.0: dense)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/sparse_attention_detection"))
    add_arguments(ap)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    detector_dir = train(a, a.out)
    samples, _ = coco_samples(CocoDataConfig(root=str(a.coco)), train=False)
    rows = []
    for recovery in a.recoveries:
        det, _ = load_detector(detector_dir)
        density = 1.0
        if recovery < 1.0:
            cfg = SparseAttentionConfig(recovery=recovery, block=a.block, calib_batches=a.calib_batches)
            density = density_report(sparsify_detector_(det, cfg, samples))["mean_density"]
        m = evaluate_coco(det, samples, torch.device("cpu"))
        rows.append({"recovery": recovery, "density": density, "map": m["bbox_mAP"], "map_50": m["bbox_mAP50"]})
        print(f"kept mass {recovery:.2f}: block density {density:.3f}  mAP {m['bbox_mAP']:.4f}  mAP@0.5 {m['bbox_mAP50']:.4f}",
              flush=True)
    result = {"size": a.size, "block": a.block, "epochs": a.epochs, "init": str(a.init), "rows": rows}
    (a.out / f"density-b{a.block}.json").write_text(json.dumps(result, indent=1))
    plot(a.out)
    if not a.no_ledger:
        table = [{"kept mass": r["recovery"], "block": a.block, "block density": r["density"], "bbox mAP": r["map"],
                  "bbox mAP@0.5": r["map_50"]} for r in rows]
        command = shlex.join(["python", "scripts/sparse_attention_detection.py", *sys.argv[1:]])
        path = record("sparse-attention-detection", table, result, command, "scripts/sparse_attention_detection.py",
                      a.ledger_dir)
        print(f"ledger: {path}")


def plot(out: Path) -> None:
    """mAP against block density for every block size run into ``out`` (density-b*.json)."""
    for path in sorted(out.glob("density-b*.json"), key=lambda p: json.loads(p.read_text())["block"]):
        run = json.loads(path.read_text())
        rows = run["rows"]
        plt.plot([r["density"] for r in rows], [r["map"] for r in rows], "o-", label=f"block {run['block']}")
        for r in rows:
            plt.annotate(f"{r['recovery']}", (r["density"], r["map"]), fontsize=7)
    plt.xlabel("mean attention block density (backbone; labels: kept mass)")
    plt.ylabel("COCO128 bbox mAP")
    plt.title("FCOS ViTDet vit_micro 128x128 (1,025 tokens), no fine-tuning")
    plt.legend()
    plt.savefig(out / "map_vs_density.png", dpi=120)

if __name__ == "__main__":
    main()
