"""scripts/gpu_bench.sh's runner: budget shares, skipping and cutting off, the environment check,
JSON after every section, and every registered section run at toy size on the CPU (so a typo
never wastes a GPU call)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from conftest import SHARED, needs_shared
from effvision.benchmarks import registry, runner
from effvision.benchmarks.registry import Section, seconds_left, sections
from effvision.benchmarks.runner import main

CIFAR, COCO = SHARED / "datasets" / "cifar10", SHARED / "datasets" / "coco128"


def _rows(args) -> list[dict]:
    return [{"budget_s": args.budget_s, "left_s": seconds_left(args), "toy": args.toy}]


def _hang(args) -> list[dict]:
    time.sleep(60)  # past its share: the runner must stop it
    return []


def _md(rows) -> list[str]:
    return ["| budget |", "|---|"] + [f"| {r['budget_s']:.1f} |" for r in rows]


def test_budget_shares_skip_cut_off_and_json_after_each_section(tmp_path: Path, monkeypatch) -> None:
    sections()  # the plugins register theirs first; the patch below then replaces the whole registry
    fake = {"second": Section(_rows, _md, priority=20, share=1.0, min_s=0.1, title="second"),
                "hangs": Section(_hang, _md, priority=10, share=1.0, min_s=0.1),
                "first": Section(_rows, _md, priority=5, share=2.0, min_s=0.1),
                "never": Section(_rows, _md, priority=30, share=0.01, min_s=50)}
    monkeypatch.setattr(registry, "_SECTIONS", fake)
    monkeypatch.setattr(runner, "GRACE_S", 0.5)
    monkeypatch.setenv("GPU_BENCH_T0", str(time.time()))
    out = tmp_path / "out"
    assert main(["--toy", "--budget-s", "8", "--sections", "second,hangs,first,never", "--out", str(out)]) == 0
    rec = {n: json.loads((out / f"{n}.json").read_text()) for n in fake}
    # priority order, shares of the time left: first gets 2/4.01 of ~8 s, hangs 1/2.01 of the rest
    assert 3.0 < rec["first"]["budget_s"] <= 4.0 and rec["first"]["status"] == "ok"
    assert rec["first"]["rows"][0]["toy"] is True and 0 < rec["first"]["rows"][0]["left_s"] <= 4.0
    assert rec["hangs"]["status"] == "cut off" and rec["hangs"]["wall_s"] < 5  # stopped, not 60 s
    assert rec["second"]["status"] == "ok"
    assert rec["never"]["status"] == "skipped" and "needs at least 50 s" in rec["never"]["reason"]
    entry = json.loads((out / "ledger.json").read_text())
    assert list(entry["sections"]) == ["first", "hangs", "second", "never"]
    assert entry["machine"].startswith("cpu-") and entry["environment"]["versions"]["torch"]
    md = (out / "gpu_bench.md").read_text()
    assert "## second" in md and "skipped:" in md and "cut off" in md


def test_environment_check_stops_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    bad = Section(_rows, _md, priority=1, share=1.0, requires=("no_such_module_xyz",),
                  recipes=(str(tmp_path / "missing.yaml"),), data=("cifar10",))
    monkeypatch.setattr(registry, "_SECTIONS", {**sections(), "bad": bad})
    out = tmp_path / "out"
    assert main(["--toy", "--sections", "bad", "--out", str(out), "--data", str(tmp_path / "nodata")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gpu_bench: environment check failed")
    assert "no_such_module_xyz" in err and "missing.yaml" in err and "nodata" in err
    assert not out.exists()  # nothing spent, nothing written
    assert main(["--sections", "inference,nope"]) == 2
    assert "unknown section 'nope'" in capsys.readouterr().err


@needs_shared
def test_every_section_passes_the_environment_check(capsys) -> None:
    # every registered section's imports, recipes and models resolve here (the GPU machine runs
    # the same check first, with its own Python)
    assert main(["--toy", "--check-only", "--data", str(CIFAR), "--coco", str(COCO)]) == 0
    assert "environment ok for cifar10, inference" in capsys.readouterr().out


def test_toy_inference_quantize_and_dynamic(tmp_path: Path) -> None:
    out = tmp_path / "out"
    torch.set_num_threads(1)
    assert main(["--toy", "--sections", "quantize,inference,dynamic", "--out", str(out), "--runs", str(tmp_path / "runs"),
                 "--mirror", str(tmp_path / "mirror")]) == 0
    inf = json.loads((out / "inference.json").read_text())
    assert inf["status"] == "ok" and inf["rows"][0]["target"] == "vit_micro_patch4_32"
    q = json.loads((out / "quantize.json").read_text())
    assert q["status"] == "ok", q
    assert [r["what"] for r in q["rows"]] == ["torch fp32", "fake-quant int8", "fake-quant fp8"]
    assert q["rows"][1]["top1_agreement_vs_fp32"] > 0.5
    md = (tmp_path / "mirror" / "gpu_bench.md").read_text()
    assert "| vit_micro_patch4_32 |" in md and "| fake-quant int8 |" in md
    assert json.loads((tmp_path / "mirror" / "ledger.json").read_text())["sections"]["quantize"]["status"] == "ok"
    dyn = json.loads((out / "dynamic.json").read_text())
    assert dyn["status"] == "ok", dyn
    assert [r["variant"] for r in dyn["rows"] if r["part"] == "throughput"] == ["dense", "ToMe r=4", "EViT keep 0.7"]
    assert all(r["img_per_s"] > 0 for r in dyn["rows"] if r["part"] == "throughput")
    assert [r["batch_size"] for r in dyn["rows"] if r["part"] == "contextual"] == [1, 8]
    assert "| vit_micro_patch4_32 | ToMe r=4 | 8 |" in (out / "gpu_bench.md").read_text()


@needs_shared
@pytest.mark.slow
def test_toy_recipe_sections(tmp_path: Path, monkeypatch) -> None:
    """cifar10, galore, prune_distill and detection at toy size: the recipes they derive run."""
    monkeypatch.setenv("HOME", str(tmp_path))  # the decode cache lands in tmp_path/.cache
    out = tmp_path / "out"
    assert main(["--toy", "--sections", "cifar10,galore,prune_distill,detection", "--out", str(out),
                 "--runs", str(tmp_path / "runs"), "--data", str(CIFAR), "--coco", str(COCO)]) == 0
    rec = {n: json.loads((out / f"{n}.json").read_text()) for n in ("cifar10", "galore", "prune_distill", "detection")}
    assert all(r["status"] == "ok" for r in rec.values()), rec
    c, t = rec["cifar10"]["rows"]
    assert c["model"] == "convvit_small_32" and c["epochs"] == 1 and c["exit_code"] == 0
    assert t["part"] == "throughput" and t["model"] == "convvit_tiny_32" and t["steady_img_per_s"] > 0
    g = rec["galore"]["rows"]
    assert [r["part"] for r in g] == ["step", "step", "cifar10"] and g[-1]["exit_code"] == 0
    assert g[1]["state_mb"] < g[0]["state_mb"]
    p = rec["prune_distill"]["rows"]
    assert [r["criterion"] for r in p] == ["taylor", "l2"] and all(r["exit_code"] == 0 for r in p), p
    assert all(r["macs_fraction"] <= 0.5 and r["pruned_top1"] is not None for r in p)
    d = rec["detection"]["rows"][0]
    assert d["exit_code"] == 0 and d["backbone"] == "mobilenetv3_large_100" and 0 <= d["bbox_mAP50"] <= 1
