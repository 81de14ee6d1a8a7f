"""The quickstart recipe end to end, as scripts/demo.sh runs it: train, eval, export, bench."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import REPO, cli


@pytest.mark.slow
def test_quickstart_recipe_end_to_end(tmp_path: Path) -> None:
    run = tmp_path / "quickstart"
    t0 = time.perf_counter()
    r = cli("run", str(REPO / "recipes" / "quickstart.yaml"), "--out", str(run))
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    train = json.loads((run / "01-train" / "summary.json").read_text())
    ev = json.loads((run / "02-eval" / "summary.json").read_text())
    export = json.loads((run / "03-export" / "summary.json").read_text())
    bench = json.loads((run / "04-bench" / "summary.json").read_text())
    # The bar: >= 95% test accuracy on digits (CPU, 2 cores).
    assert ev["top1"] >= 95.0, ev
    assert abs(ev["top1"] - train["top1"]) < 1e-6  # eval stage reproduces the trainer's own evaluation
    assert train["params_m"] > 0 and train["gmacs"] > 0 and train["train_img_per_s"] > 0
    assert export["parity"]["max_abs_error"] <= 1e-4
    assert [x["backend"] for x in bench["results"]] == ["torch", "ort"]
    assert (run / "04-bench" / "bench.png").stat().st_size > 0
    metrics = [json.loads(line) for line in (run / "01-train" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("eval") for m in metrics) and all("loss" in m for m in metrics)
    env = json.loads((run / "environment.json").read_text())
    assert "torch" in env["versions"] and "cpu" in env["hardware"]
    print(f"quickstart: top1 {ev['top1']:.2f}% in {elapsed:.0f} s wall ({train['train_time_s']:.0f} s training)")

    # `effvision eval RUN_DIR` reproduces the number; a rerun skips every finished stage.
    r = cli("eval", str(run))
    assert r.returncode == 0, r.stderr
    assert abs(json.loads(r.stdout)["top1"] - ev["top1"]) < 1e-6
    r = cli("run", str(REPO / "recipes" / "quickstart.yaml"), "--out", str(run))
    assert r.returncode == 0 and r.stdout.count("finished earlier, skipping") == 4
