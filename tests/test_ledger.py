"""The results ledger (bench/results/) and the tables of the README and docs/ generated from it."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO
from effvision.benchmarks.ledger import (BLOCK, LEDGER_DIR, add_entry, entry_problems, load_ledger, main, pages,
                                         record, render_block, update_page)


def _gpu_entry(date: str, gpu: str, img_per_s: float) -> dict[str, Any]:
    """A gpu_bench ledger.json as the runner writes it (made here: no GPU run is in the ledger)."""
    return {"date": date, "machine": gpu.lower().replace(" ", "-"), "command": "scripts/gpu_bench.sh",
            "source": "gpu_bench",
            "environment": {"versions": {"torch": "2.11.0+cu130", "timm": "1.0.29"}, "git_sha": "0" * 40,
                            "hardware": {"gpu": {"name": gpu}, "cpu_count": 16}},
            "sections": {"inference": {"status": "ok", "raw": {"deit_tiny_patch16_224": [0.0101, 0.0100]},
                                       "rows": [{"target": "deit_tiny_patch16_224", "backend": "torch",
                                                 "img_per_s": img_per_s}]}}}


def test_generated_tables_agree_with_the_ledger() -> None:
    names = {m.group("name") for p in pages() for m in BLOCK.finditer(p.read_text())}
    assert {"quickstart", "inference", "cifar10", "gpu-status"} <= names
    entries = load_ledger()
    for page in pages():
        text = page.read_text()
        assert update_page(text, entries) == text, f"{page.name}: run python -m effvision.benchmarks.ledger render"


def test_every_ledger_entry_holds_raw_numbers_and_where_they_came_from() -> None:
    files = sorted(LEDGER_DIR.glob("*.json"))
    assert files and all(f.stat().st_size < 256 * 1024 for f in files)
    for e in load_ledger():
        assert entry_problems(e) == [], e["_file"]
    quick = [e for e in load_ledger() if "quickstart" in e["sections"]]
    raw = quick[-1]["sections"]["quickstart"]["raw"]
    assert len(raw["bench_times_ms"]["ort"]) >= 10  # every timed call, not a summary


def test_an_entry_without_raw_numbers_is_refused(tmp_path: Path) -> None:
    typed_in = _gpu_entry("2026-11-27", "NVIDIA H100 80GB HBM3", 25469.0)
    del typed_in["sections"]["inference"]["raw"]
    src = tmp_path / "typed.json"
    src.write_text(json.dumps(typed_in))
    assert entry_problems(typed_in) == ["section inference: no raw numbers"]
    with pytest.raises(ValueError, match="no raw numbers"):
        add_entry(src, tmp_path / "results")
    assert main(["add", str(src)]) == 2 and not (tmp_path / "results").exists()
    with pytest.raises(ValueError, match="raw"):
        record("halp-vs-uniform", [{"variant": "uniform"}], raw=[], command="python scripts/x.py", source="x",
               root=tmp_path / "results")


def test_check_fails_on_a_table_typed_into_a_generated_block(tmp_path: Path, capsys) -> None:
    page = tmp_path / "page.md"
    page.write_text("# p\n\n<!-- ledger:quickstart -->\n| model | top-1 |\n|---|---|\n| typed | 99% |\n"
                    "<!-- /ledger:quickstart -->\n\n<!-- ledger:cifar10 -->\n<!-- /ledger:cifar10 -->\n")
    assert main(["render", str(page), "--check"]) == 1
    assert "quickstart" in capsys.readouterr().err
    assert main(["render", str(page)]) == 0
    text = page.read_text()
    assert "typed" not in text and "| vit_micro_patch4_32 |" in text  # the ledger's row replaced it
    assert "**unmeasured**: no run in the ledger" in text.split("<!-- ledger:cifar10 -->")[1]
    assert main(["render", str(page), "--check"]) == 0


def test_record_files_a_figure_script_result_with_its_environment(tmp_path: Path) -> None:
    path = record("halp-vs-uniform", [{"variant": "halp", "speedup": 1.93}, {"variant": "uniform", "speedup": 1.5}],
                  raw={"halp": [10.1, 10.3], "uniform": [13.2, 13.0]}, command="python scripts/halp_vs_uniform.py",
                  source="scripts/halp_vs_uniform.py", root=tmp_path)
    again = record("halp-vs-uniform", [{"variant": "halp", "speedup": 2.0}], raw={"halp": [9.9]},
                   command="python scripts/halp_vs_uniform.py", source="scripts/halp_vs_uniform.py", root=tmp_path)
    assert path != again and path.exists()  # same day and section: kept beside, never overwritten
    e = json.loads(path.read_text())
    assert e["environment"]["git_sha"] and e["environment"]["versions"]["torch"] and e["machine"].startswith("cpu-")
    table = render_block("halp-vs-uniform", load_ledger(tmp_path))
    assert "| variant | speedup |" in table and "| halp | 2.00 |" in table and "1.93" not in table  # the newer run only
    assert "`python scripts/halp_vs_uniform.py`" in table


def test_unmeasured_sections_show_as_unmeasured() -> None:
    entries = load_ledger()
    assert render_block("cifar10", entries).startswith("**unmeasured**")
    rows = {line.split("|")[1].strip(): line for line in render_block("gpu-status", entries).splitlines()[2:]}
    assert "**unmeasured**" in rows["cifar10"] and "**unmeasured**" in rows["galore"]


def test_latest_entry_per_machine_kind(tmp_path: Path) -> None:
    base = _gpu_entry("2026-11-27", "NVIDIA H100 80GB HBM3", 25469.0)
    newer = _gpu_entry("2026-12-01", "NVIDIA H100 80GB HBM3", 26000.0)
    h200 = _gpu_entry("2026-12-01", "NVIDIA H200", 31000.0)
    h200["sections"]["cifar10"] = {"status": "ok", "raw": {"epoch_s": [2.4, 2.5]}, "rows": [
        {"variant": "reference", "model": "convvit_small_32", "epochs": 40, "train_time_s": 101.0,
         "train_img_per_s": 21000.0, "top1": 90.5}]}
    h200["sections"]["galore"] = {"status": "skipped", "reason": "budget", "rows": []}
    root = tmp_path / "results"
    for e in (base, newer, h200, copy.deepcopy(h200)):
        src = tmp_path / "e.json"
        src.write_text(json.dumps(e))
        add_entry(src, root)
    assert sorted(p.name for p in root.iterdir()) == [
        "2026-11-27-nvidia-h100-80gb-hbm3.json", "2026-12-01-nvidia-h100-80gb-hbm3.json",
        "2026-12-01-nvidia-h200-2.json", "2026-12-01-nvidia-h200.json"]
    entries = load_ledger(root)
    inf = render_block("inference", entries)
    assert inf.count("_NVIDIA H") == 2  # one table per machine kind
    assert "26,000" in inf and "25,469" not in inf  # the latest run only
    assert "2026-12-01" in inf and "`scripts/gpu_bench.sh`" in inf
    c10 = render_block("cifar10", entries)
    assert "| reference | convvit_small_32 | 40 | 101.0 | 21,000 / n/a | 90.50% |" in c10
    rows = {line.split("|")[1].strip(): line for line in render_block("gpu-status", entries).splitlines()[2:]}
    assert "NVIDIA H200, 2026-12-01" in rows["cifar10"] and "**unmeasured**" in rows["galore"]  # skipped != measured


def test_pages_are_the_readme_and_every_docs_page() -> None:
    found = {p.relative_to(REPO).as_posix() for p in pages()}
    assert "README.md" in found and "docs/getting-started.md" in found and "docs/gpu-benchmark.md" in found


def test_a_figure_script_files_its_measurement(tmp_path: Path) -> None:
    """scripts/ort_roundrobin.py end to end: its table lands in the ledger with every round's img/s,
    and the rendered table shows the medians of those rounds."""
    import statistics
    import subprocess
    import sys

    import timm

    import effvision as ev

    for name in ("a", "b"):
        ev.save(timm.create_model("vit_micro_patch4_32", num_classes=10), tmp_path / name)
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "ort_roundrobin.py"), str(tmp_path / "a"),
                        str(tmp_path / "b"), "--rounds", "3", "--iters", "2", "--batch-size", "4", "--threads", "1",
                        "--ledger-dir", str(tmp_path / "ledger")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (entry,) = load_ledger(tmp_path / "ledger")
    assert entry_problems(entry) == [] and entry["source"] == "scripts/ort_roundrobin.py"
    assert entry["command"].startswith("python scripts/ort_roundrobin.py ")
    section = entry["sections"]["ort-roundrobin"]
    per_target = section["raw"]["img_per_s_per_round"]
    assert len(per_target) == 2 and all(len(v) == 3 for v in per_target.values())  # every round, not a summary
    medians = sorted(statistics.median(v) for v in per_target.values())
    shown = sorted(row["img/s (median)"] for row in section["rows"])
    assert shown == pytest.approx(medians)
