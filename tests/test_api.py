"""The notebook API (effvision.api): the README example runs as written, and each verb keeps the
contracts of the recipe stages (saved dirs reload exactly, calibration as a forward loop)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import effvision as ev
from effvision.errors import EffVisionError

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs_as_written(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- api-example -->\n```python\n(.*?)```\n<!-- /api-example -->", text, re.S)
    assert block, "README lost its api-example block"
    script = tmp_path / "example.py"
    script.write_text(block.group(1))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("teacher", "int8")))
    assert float(out["teacher"]) > 60.0, r.stdout  # 10 epochs on digits: well above chance (10%)
    assert int(out["int8"].split()[-1]) > 0
    manifest = json.loads((tmp_path / "out/onnx/manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["target"] == "ort-cpu"
    # The saved dir is an effvision model dir: it reloads pruned and quantized, same outputs.
    model, spec = ev.load(tmp_path / "out/student")
    assert spec.pruned and (tmp_path / "out/student/quant.json").is_file()
    # timm's config.json says it is not a plain timm checkpoint, and how to load it.
    marked = json.loads((tmp_path / "out/student/config.json").read_text())["effvision"]
    assert marked == {"pruned": True, "quantized": True, "load_with": "effvision.models.load_model(DIR)"}


def _micro() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_micro_patch4_32", num_classes=10)


def test_forward_loop_calibration_matches_batches() -> None:
    data = [(torch.randn(16, 3, 32, 32), torch.zeros(16, dtype=torch.long)) for _ in range(3)]
    a, b = _micro(), _micro()
    ra = ev.quantize(a, ev.QuantConfig(target="ort-cpu"), calib=data)

    def loop(model: torch.nn.Module) -> None:  # any data pipeline: the user runs the model
        for x, _ in data:
            model(x)

    rb = ev.quantize(b, ev.QuantConfig(target="ort-cpu"), calib=loop)
    assert ra.calib_samples == rb.calib_samples == 48
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_pruned_model_saves_and_reloads_exactly(tmp_path: Path) -> None:
    model = _micro()
    ev.prune(model, {"mlp": 0.5}, example_inputs=torch.randn(1, 3, 32, 32))
    ev.save(model, tmp_path / "m")
    again, spec = ev.load(tmp_path / "m")
    assert spec.pruned and spec.name == "vit_micro_patch4_32"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x), model.eval()(x))
    with pytest.raises(EffVisionError, match="holds a model already"):
        ev.save(model, tmp_path / "m")


def test_constructor_kwargs_that_cannot_be_inferred_are_asked_for(tmp_path: Path) -> None:
    model = timm.create_model("vit_micro_patch4_32", num_classes=10, depth=2)
    with pytest.raises(EffVisionError, match="pass the constructor's kwargs"):
        ev.save(model, tmp_path / "m")
    ev.save(model, tmp_path / "m", kwargs={"depth": 2})
    assert len(ev.load(tmp_path / "m")[0].blocks) == 2
