"""gpu_bench section "assemble": recipes/cifar10_vit_tiny.yaml's target (convvit_small_32, 6
blocks) assembled from K = 2 and 3 modules vs trained end to end at equal compute."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import load_yaml
from .compare import compare_assembled, compare_markdown

__all__ = ["assemble_section", "assemble_markdown"]


def assemble_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    recipe = load_yaml(Path(__file__).resolve().parents[2] / "recipes" / "cifar10_vit_tiny.yaml")
    train = {k: v for k, v in recipe.pop("stages")[0].items() if k not in ("type", "epochs")}
    recipe["data"]["root"] = str(args.data)
    epochs, modules = 40, [2, 3]
    if getattr(args, "toy", False):  # CPU check of the section's plumbing: digits, 2 blocks, 4 epochs
        recipe.update(device="cpu")
        recipe["model"]["kwargs"]["depth"] = 2
        recipe["data"] = {"name": "digits", "batch_size": 32, "limit_train": 64, "limit_eval": 32}
        train.update(compile=False, channels_last=False, amp="off", optimizer={"name": "adamw", "lr": 1e-3}, log_every=1,
                     scheduler={"name": "cosine", "warmup_epochs": 0})
        epochs, modules = 4, [2]
    depth = recipe["model"]["kwargs"].get("depth", 6)
    return compare_assembled(recipe, train, epochs, depth, modules, Path(args.runs), f"assemble-{args.stamp}")


def assemble_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The table only: the gpu_bench runner writes the section's heading."""
    return compare_markdown(rows)
