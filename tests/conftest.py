"""Shared helpers: run the CLI as a user does, write small recipes."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one thread per worker, in this process and its children
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
THREADS = torch.get_num_threads()  # what a fresh `effvision` process starts with here


def cli_process(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m effvision ARGS`` in a subprocess (a fresh process: for what must not share this
    one's state, e.g. torchrun); returns the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "effvision", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """``effvision ARGS`` as the command line runs it (``effvision.cli.main``), in this process:
    a subprocess would spend seconds importing torch each time. Output, exit code and the global
    torch state a run may set (threads, deterministic algorithms, the RNG) are kept apart from the
    caller's. An exception the CLI does not turn into a one-line error is exit code 1 with its
    traceback on stderr, as in a subprocess. ``timeout`` is accepted for the subprocess form."""
    from effvision.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state(),
             os.getcwd(), dict(os.environ))
    os.environ.update(env or {})
    torch.set_num_threads(THREADS)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse errors
                code = e.code if isinstance(e.code, int) else 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved[3])
        os.environ.clear()
        os.environ.update(saved[4])
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.set_rng_state(saved[2])
    return subprocess.CompletedProcess(["effvision", *args], code, out.getvalue(), err.getvalue())


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


@pytest.fixture(autouse=True)
def _torch_state() -> Any:
    """A test that sets torch's threads or deterministic mode does not change the tests after it."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(saved[0])
    torch.use_deterministic_algorithms(saved[1])


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Per-machine caches (latency tables) go to a temporary folder, not the user's ~/.cache."""
    os.environ["EFFVISION_CACHE"] = str(tmp_path_factory.mktemp("effvision-cache"))


# Files with the longest tests start first, so that under `pytest -n 2 --dist loadfile` (scripts/test.sh)
# neither worker is left with a several-minute file at the end (CI durations, 2 cores).
_FIRST = ("test_quickstart.py", "test_composition.py", "test_gpu_bench.py", "test_api.py", "test_recipes.py",
          "test_token_drop.py", "test_ddp.py", "test_config.py", "test_resume.py", "test_extending.py",
          "test_run_guarantees.py", "test_fuzz_inputs.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(_FIRST)))  # stable: the rest keep their order
