"""The results ledger (bench/results/) and the README tables generated from it."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from conftest import REPO
from effvision.benchmarks.ledger import (BLOCK, LEDGER_DIR, add_entry, load_ledger, main, render_block, update_readme)

README = REPO / "README.md"


def test_readme_tables_agree_with_the_ledger() -> None:
    text = README.read_text()
    names = [m.group("name") for m in BLOCK.finditer(text)]
    assert {"quickstart", "inference", "cifar10", "gpu-status"} <= set(names)
    assert update_readme(text, load_ledger()) == text, "run: python -m effvision.benchmarks.ledger readme"


def test_check_fails_when_a_readme_figure_is_edited_by_hand(tmp_path: Path, capsys) -> None:
    readme = tmp_path / "README.md"
    text = README.read_text()
    assert "| deit_small_patch16_224 | 18,707 | 24,581 |" in text  # seeded from the H100 run
    readme.write_text(text.replace("18,707", "18,708"))
    assert main(["readme", "--readme", str(readme), "--check"]) == 1
    assert "inference" in capsys.readouterr().err
    assert main(["readme", "--readme", str(readme)]) == 0
    assert readme.read_text() == text  # regenerated; everything outside the markers untouched


def test_seed_entries_are_small_text_and_say_where_they_came_from() -> None:
    files = sorted(LEDGER_DIR.glob("*.json"))
    assert files and all(f.stat().st_size < 64 * 1024 for f in files)
    for e in load_ledger():
        assert e["date"] and e["machine"] and e["command"] and e["source"] and e["sections"]
    h100 = [e for e in load_ledger() if e["machine"] == "nvidia-h100-80gb-hbm3"]
    assert h100 and "transcribed from the README of commit ed42dbd" in h100[0]["source"]


def test_unmeasured_sections_show_as_unmeasured() -> None:
    entries = load_ledger()
    assert render_block("cifar10", entries).startswith("**unmeasured**")
    status = render_block("gpu-status", entries)
    assert "| cifar10 |" in status and "| inference |" in status
    rows = {line.split("|")[1].strip(): line for line in status.splitlines()[2:]}
    assert "**unmeasured**" in rows["cifar10"] and "**unmeasured**" in rows["galore"]
    assert "NVIDIA H100 80GB HBM3, 2026-11-27" in rows["inference"]


def test_latest_entry_per_machine_kind(tmp_path: Path) -> None:
    base = json.loads((LEDGER_DIR / "2026-11-27-nvidia-h100-80gb-hbm3.json").read_text())
    newer = copy.deepcopy(base)
    newer.update(date="2026-12-01", source="gpu_bench", command="scripts/gpu_bench.sh")
    newer["sections"]["inference"]["rows"][0]["img_per_s"] = 26000.0
    h200 = copy.deepcopy(newer)
    h200.update(machine="nvidia-h200")
    h200["environment"]["hardware"]["gpu"]["name"] = "NVIDIA H200"
    h200["sections"]["cifar10"] = {"status": "ok", "rows": [
        {"variant": "reference", "model": "convvit_small_32", "epochs": 40, "train_time_s": 101.0,
         "train_img_per_s": 21000.0, "top1": 90.5}]}
    h200["sections"]["galore"] = {"status": "skipped", "reason": "budget", "rows": []}
    root = tmp_path / "results"
    for e in (base, newer, h200):
        src = tmp_path / "e.json"
        src.write_text(json.dumps(e))
        add_entry(src, root)
    add_entry(src, root)  # same date and machine again: kept beside, not overwritten
    assert sorted(p.name for p in root.iterdir()) == [
        "2026-11-27-nvidia-h100-80gb-hbm3.json", "2026-12-01-nvidia-h100-80gb-hbm3.json",
        "2026-12-01-nvidia-h200-2.json", "2026-12-01-nvidia-h200.json"]
    entries = load_ledger(root)
    inf = render_block("inference", entries)
    assert inf.count("_NVIDIA H") == 2  # one table per machine kind
    assert "| deit_tiny_patch16_224 | 26,000 |" in inf and "25,469" not in inf  # the latest run only
    assert "2026-12-01" in inf and "`scripts/gpu_bench.sh`" in inf
    c10 = render_block("cifar10", entries)
    assert "| reference | convvit_small_32 | 40 | 101.0 | 21,000 / n/a | 90.50% |" in c10
    rows = {line.split("|")[1].strip(): line for line in render_block("gpu-status", entries).splitlines()[2:]}
    assert "NVIDIA H200, 2026-12-01" in rows["cifar10"] and "**unmeasured**" in rows["galore"]  # skipped != measured
