"""The race's clock: every contender timed in turn within each round, in one process (load from
other jobs falls on all alike, so the ranking holds where absolute img/s drift), medians over
rounds; and the recorded timings, so that a rerun on the same machine, model, data and settings
reads the ranking instead of the noisy clock (like HALP's latency table), unless asked to
measure again."""
from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from effvision.bench import time_calls
from effvision.io import atomic_write_text

__all__ = ["round_robin", "RecordedTimings", "summarize"]

Runner = Callable[[np.ndarray], np.ndarray]


def round_robin(runners: dict[str, Runner], shape: tuple[int, int, int], batch_sizes: list[int], rounds: int,
                warmup: int, iters: int) -> dict[str, dict[str, list[float]]]:
    """{name: {batch: [median seconds per call, one per round]}}."""
    from tqdm import tqdm

    x = {b: np.random.default_rng(b).standard_normal((b, *shape), dtype=np.float32) for b in batch_sizes}
    times: dict[str, dict[str, list[float]]] = {n: {str(b): [] for b in batch_sizes} for n in runners}
    with tqdm(total=rounds * len(runners) * len(batch_sizes), desc="race", unit="timing") as bar:
        for _ in range(rounds):
            for b in batch_sizes:
                for name, run in runners.items():
                    calls = time_calls(lambda: run(x[b]), warmup, iters, lambda: None)
                    times[name][str(b)].append(statistics.median(calls))
                    bar.update()
    return times


def summarize(per_round: list[float], batch: int) -> dict[str, Any]:
    """img/s from seconds per call: the median over rounds and the spread (slowest-fastest round)."""
    rates = [batch / t for t in per_round]
    return {"img_per_s": statistics.median(rates), "spread_img_per_s": [min(rates), max(rates)],
            "latency_ms": statistics.median(per_round) * 1e3, "rounds_img_per_s": [round(r, 2) for r in rates]}


class RecordedTimings:
    """One race's timings in a JSON file keyed by everything that sets them: the machine (CPU,
    cores, threads), the runtimes' versions, the model's files, the check data, the contenders
    and the timing settings."""

    def __init__(self, key: dict[str, Any]) -> None:
        root = Path(os.environ.get("EFFVISION_CACHE", Path.home() / ".cache" / "effvision"))
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.key = key
        self.path = root / "race" / f"{digest}.json"

    def read(self) -> dict[str, dict[str, list[float]]] | None:
        if not self.path.is_file():
            return None
        try:
            data = json.loads(self.path.read_text())
        except ValueError:
            return None  # a damaged record is measured again, never trusted
        return data["times"] if data.get("key") == self.key else None

    def write(self, times: dict[str, dict[str, list[float]]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"key": self.key, "times": times}, indent=1))
