"""Shared helpers: run the CLI as a user does, write small recipes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m effvision ARGS`` in a subprocess; returns the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "effvision", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_recipe(path: Path, train: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
                model: dict[str, Any] | None = None, stages: list[dict[str, Any]] | None = None,
                **top: Any) -> Path:
    """A seconds-long digits recipe on the CPU; sections are merged over the defaults."""
    recipe = {
        "name": "tiny", "seed": 0, "device": "cpu", "deterministic": True,
        "model": {"name": "vit_micro_patch4_32", "kwargs": {}, **(model or {})},
        "data": {"name": "digits", "batch_size": 64, "limit_train": 512, "limit_eval": 128,
                 "augment": {"crop_padding": 2, "hflip": False}, **(data or {})},
        "stages": stages if stages is not None else [{
            "type": "train", "epochs": 2, "optimizer": {"name": "adamw", "lr": 2.0e-3},
            "scheduler": {"name": "cosine", "warmup_epochs": 1}, "log_every": 4, **(train or {})}],
        **top,
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


needs_shared = pytest.mark.skipif(not (SHARED / "datasets").is_dir(),
                                  reason="../shared/datasets is absent (datasets live beside the checkout)")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Per-machine caches (latency tables) go to a temporary folder, not the user's ~/.cache."""
    os.environ["EFFVISION_CACHE"] = str(tmp_path_factory.mktemp("effvision-cache"))
