"""random-LTD vs dense on the quickstart recipe, side by side in one invocation: layer-tokens
processed, measured training img/s and test top-1 at equal epochs, and accuracy against
training wall-clock (token_drop_cpu.png and token_drop_cpu.json in --out); the table is filed in the
results ledger (section token-drop-cpu-figures) unless --no-ledger.

    .venv/bin/python scripts/token_drop_cpu_figures.py --out runs/token_drop_cpu [--epochs 30]
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from effvision.benchmarks.ledger import add_arguments, record
from effvision.tokens import TokenDropConfig
from effvision.tokens.random_ltd import layer_tokens

TOKEN_DROP = {"start_tokens": 16, "buckets": 4, "layer_token_lr": True}  # schedule: the first half of the run
DEPTH, PATCHES, TRAIN_IMAGES = 4, 64, 1347                                # vit_micro_patch4_32 on digits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/token_drop_cpu")
    p.add_argument("--epochs", type=int, default=30)
    add_arguments(p)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path("recipes/quickstart.yaml").read_text())
    base["stages"] = base["stages"][:1]
    base["stages"][0].update(epochs=args.epochs, eval_every=max(args.epochs // 6, 1))
    rows = []
    for label, extra in (("dense", {}), ("random-LTD", {"token_drop": TOKEN_DROP})):
        recipe = copy.deepcopy(base)
        recipe["stages"][0].update(extra)
        path = out / f"{label}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        run = out / label
        subprocess.run([sys.executable, "-m", "effvision", "run", str(path), "--out", str(run)], check=True)
        s = json.loads((run / "01-train" / "summary.json").read_text())
        curve = []
        for line in (run / "01-train" / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("eval"):
                curve.append((r["train_time_s"], r["top1"]))  # the training clock at this evaluation
        steps = args.epochs * (TRAIN_IMAGES // base["data"]["batch_size"])
        cfg = TokenDropConfig(**TOKEN_DROP) if extra else TokenDropConfig(start_tokens=PATCHES)
        processed, dense = layer_tokens(cfg, PATCHES, DEPTH, DEPTH - 2, steps, base["data"]["batch_size"])
        rows.append({"variant": label, "top1": s["top1"], "train_time_s": s["train_time_s"],
                     "train_img_per_s": s["train_img_per_s"], "layer_tokens": processed,
                     "layer_token_fraction": processed / dense, "curve": curve})
        print(f"{label}: top1 {s['top1']:.2f}%  {s['train_img_per_s']:.0f} img/s  "
              f"layer-tokens {processed / dense:.2f} of dense", flush=True)
    (out / "token_drop_cpu.json").write_text(json.dumps(rows, indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.plot(*zip(*r["curve"]), marker="o", label=r["variant"])
    ax.set(xlabel="training wall-clock (s, evaluation excluded)", ylabel="test top-1 (%)",
           title="quickstart (vit_micro_patch4_32, digits), CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "token_drop_cpu.png")
    print(f"wrote {out / 'token_drop_cpu.json'} and {out / 'token_drop_cpu.png'}")
    if not args.no_ledger:
        table = [{"variant": r["variant"], "epochs": args.epochs, "test top-1 (%)": r["top1"],
                  "training time (s)": r["train_time_s"], "training img/s": r["train_img_per_s"],
                  "layer-tokens vs dense": r["layer_token_fraction"]} for r in rows]
        command = shlex.join(["python", "scripts/token_drop_cpu_figures.py", *sys.argv[1:]])
        path = record("token-drop-cpu-figures", table, {"token_drop": TOKEN_DROP, "rows": rows}, command,
                      "scripts/token_drop_cpu_figures.py", args.ledger_dir)
        print(f"ledger: {path}")


if __name__ == "__main__":
    main()
