"""docs/extending.md's toy technique, plugged in as a package outside effvision (its entry point
in the ``effvision.plugins`` group): its mode and stage reach the recipe parser, the CLI, the
mode rules, save/load in a fresh process and the ONNX export, with no edit to effvision."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, cli_process, tiny_recipe


def _toy_package(root: Path) -> Path:
    """The toy package exactly as docs/extending.md shows it, plus the entry point pip would write."""
    doc = (REPO / "docs" / "extending.md").read_text()
    files = dict(re.findall(r"<!-- file: (\S+) -->\n```python\n(.*?)```", doc, re.S))
    assert set(files) == {"toy_temperature/__init__.py", "toy_temperature/plugin.py"}, sorted(files)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    dist = root / "toy_temperature-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-temperature\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[effvision.plugins]\ntemperature = toy_temperature.plugin\n")
    return root


def test_a_toy_technique_plugs_in_at_one_place(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(_toy_package(tmp_path / "site"))}
    recipe = tiny_recipe(tmp_path / "r.yaml", data={"limit_train": 128, "limit_eval": 64}, stages=[
        {"type": "train", "epochs": 1, "optimizer": {"name": "adamw", "lr": 2.0e-3}},
        {"type": "temperature", "t": 2.0},
        {"type": "export"}])
    run = tmp_path / "run"
    r = cli_process("run", str(recipe), "--out", str(run), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "02-temperature" / "summary.json").read_text())
    assert summary["t"] == 2.0 and summary["before"]["top1"] == summary["after"]["top1"]  # same argmax
    spec = json.loads((run / "02-temperature" / "model" / "model.json").read_text())
    assert [m["mode"] for m in spec["modes"]] == ["temperature"]
    manifest = json.loads((run / "03-export" / "manifest.json").read_text())
    assert manifest["parity"]["max_abs_error"] <= 1e-4
    # a fresh process rebuilds both models from their dirs: the tempered logits are half the trained ones
    code = (f"import torch\nfrom effvision.models.io import load_model\n"
            f"a, _ = load_model({str(run / '01-train' / 'model')!r})\n"
            f"b, _ = load_model({str(run / '02-temperature' / 'model')!r})\n"
            f"x = torch.randn(4, 3, 32, 32)\n"
            f"torch.testing.assert_close(b.eval()(x) * 2, a.eval()(x))\n"
            f"print(type(b.head).__name__)")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "TemperedLinear", p.stderr[-2000:]
    # the recipe docs/extending.md shows parses with the plugin installed (tests/test_docs.py leaves it here)
    shown = re.search(r"```yaml\n(stages:.*?)```", (REPO / "docs" / "extending.md").read_text(), re.S).group(1)
    code = ("import sys, yaml\nfrom effvision.recipe import parse_recipe\n"
            "r = parse_recipe({'model': {'name': 'vit_micro_patch4_32'}, **yaml.safe_load(sys.stdin.read())})\n"
            "print([s.type for s in r.stages])")
    p = subprocess.run([sys.executable, "-c", code], input=shown, env={**os.environ, **env}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "'temperature'" in p.stdout, p.stderr[-2000:]
    # the mode rules hold for it too: nothing may follow quantize, refused before any run directory exists
    bad = tiny_recipe(tmp_path / "bad.yaml", stages=[{"type": "quantize"}, {"type": "temperature"}])
    r = cli_process("run", str(bad), "--out", str(tmp_path / "bad"), env=env)
    assert r.returncode == 2 and not (tmp_path / "bad").exists(), r.stderr
    assert "temperature cannot follow quantize" in r.stderr and len(r.stderr.strip().splitlines()) == 1
