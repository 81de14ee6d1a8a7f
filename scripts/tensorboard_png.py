"""Render a stage's TensorBoard scalars as one PNG (for READMEs and reports, where a live
TensorBoard is not at hand). Reads the event files with TensorBoard's own EventAccumulator.

    python scripts/tensorboard_png.py runs/quickstart/01-train --out docs/quickstart_tensorboard.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

PANELS = (("train/loss", "training loss"), ("train/lr", "learning rate"), ("eval/top1", "test top-1 (%)"),
          ("train/img_per_s", "training img/s"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage_dir", help="a stage folder holding tensorboard/ (e.g. runs/quickstart/01-train)")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--title", default=None, help="figure title (default: the stage folder)")
    args = p.parse_args()
    events = EventAccumulator(str(Path(args.stage_dir) / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    panels = [(t, label) for t, label in PANELS if t in tags]
    if not panels:
        raise SystemExit(f"no effvision scalars in {args.stage_dir}/tensorboard")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0))
    for ax, (tag, label) in zip(list(axes) if len(panels) > 1 else [axes], panels):
        points = events.Scalars(tag)
        ax.plot([e.step for e in points], [e.value for e in points], marker="o" if tag.startswith("eval") else None,
                markersize=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(args.title or str(args.stage_dir), fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
