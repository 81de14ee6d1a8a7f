"""The notebook API (effvision.api): the Python API page's example runs as written, and each verb keeps the
contracts of the recipe stages (saved dirs reload exactly, calibration as a forward loop)."""
from __future__ import annotations

import copy
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


def test_python_api_page_example_runs_as_written(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "python-api.md").read_text()
    block = re.search(r"<!-- example -->\n```python\n(.*?)```\n<!-- /example -->", text, re.S)
    assert block, "docs/python-api.md lost its example block"
    script = tmp_path / "example.py"
    script.write_text(block.group(1))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines()
               if line.startswith(("teacher", "int8", "modes", "round-trip")))
    assert float(out["teacher"]) > 60.0, r.stdout  # 10 epochs on digits: well above chance (10%)
    assert int(out["int8"].split()[-1]) > 0
    assert out["modes"] == "['prune', 'quantize']" and float(out["round-trip"].split()[-1]) == 0.0, r.stdout
    manifest = json.loads((tmp_path / "out/onnx/manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["target"] == "ort-cpu"
    # The saved dirs are effvision model dirs whose record says pruned, then quantized: the copy the
    # loaded model was saved to holds the same record and the same weights.
    for d in ("out/student", "out/student-copy"):
        assert [m["mode"] for m in json.loads((tmp_path / d / "model.json").read_text())["modes"]] == \
            ["prune", "quantize"]
        # timm's config.json says it is not a plain timm checkpoint, and how to load it.
        marked = json.loads((tmp_path / d / "config.json").read_text())["effvision"]
        assert marked == {"modes": ["prune", "quantize"], "load_with": "effvision.models.load_model(DIR)"}
    assert (tmp_path / "out/student/model.safetensors").read_bytes() == \
        (tmp_path / "out/student-copy/model.safetensors").read_bytes()


def _micro() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_micro_patch4_32", num_classes=10)


def test_distill_follows_the_teacher() -> None:
    """ev.distill as docs/python-api.md calls it (soft, alpha 0.5, T 2), with two different teachers: each
    student ends closer (KL on the training images) to its own teacher than the other student is.
    A distillation that ignored the teacher would train the same student twice."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]
    x = torch.cat([b[0] for b in data])

    def teacher(seed: int) -> torch.nn.Module:  # a random linear map, scaled to confident logits
        torch.manual_seed(seed)
        t = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
        with torch.no_grad():
            t[1].weight.mul_(5.0)
        return t

    def kl(t: torch.nn.Module, s: torch.nn.Module) -> float:  # KL(teacher || student), the KD direction
        with torch.no_grad():
            return float(torch.nn.functional.kl_div(s.eval()(x).log_softmax(-1), t.eval()(x).log_softmax(-1),
                                                    reduction="batchmean", log_target=True))

    teachers = {"a": teacher(1), "b": teacher(2)}
    torch.manual_seed(0)
    init = timm.create_model("vit_micro_patch4_32", depth=1, num_classes=10)
    students = {k: copy.deepcopy(init) for k in teachers}
    for k, s in students.items():
        ev.distill(s, teachers[k], data, epochs=8, lr=3e-3)
    for own, other in (("a", "b"), ("b", "a")):
        mine, theirs = kl(teachers[own], students[own]), kl(teachers[own], students[other])
        assert mine < 0.95 * theirs, (own, mine, theirs)
    # a misspelt kind is refused by name (it used to train with hard labels), the student untouched
    before = {k: v.clone() for k, v in students["a"].state_dict().items()}
    with pytest.raises(ev.ConfigError, match="distill.kind: 'sofft' is not one of soft, hard, token"):
        ev.distill(students["a"], teachers["a"], data, kind="sofft", epochs=1)
    assert all(torch.equal(v, students["a"].state_dict()[k]) for k, v in before.items())


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
    again = ev.load(tmp_path / "m")
    spec = ev.spec_of(again)
    assert [m["mode"] for m in spec.modes] == ["prune"] and spec.name == "vit_micro_patch4_32"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x), model.eval()(x))
    with pytest.raises(EffVisionError, match="holds a model already"):
        ev.save(model, tmp_path / "m")


def test_load_then_save_works_on_a_plain_dense_model(tmp_path: Path) -> None:
    """The reported failure: ev.load(DIR) then ev.save(model, DIR2) on a dense model saved a moment
    before (load returned a tuple, and save could not find the model's architecture)."""
    model = _micro()
    ev.save(model, tmp_path / "a", img_size=32, class_names=[str(i) for i in range(10)])
    loaded = ev.load(tmp_path / "a")
    ev.save(loaded, tmp_path / "b")  # no spec arguments: the loaded model carries its spec
    again = ev.load(tmp_path / "b")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x), model.eval()(x), rtol=0, atol=0)
    assert json.loads((tmp_path / "b" / "model.json").read_text()) == \
        json.loads((tmp_path / "a" / "model.json").read_text())


def test_constructor_kwargs_that_cannot_be_inferred_are_asked_for(tmp_path: Path) -> None:
    model = timm.create_model("vit_micro_patch4_32", num_classes=10, depth=2)
    with pytest.raises(EffVisionError, match="pass the constructor's kwargs"):
        ev.save(model, tmp_path / "m")
    ev.save(model, tmp_path / "m", kwargs={"depth": 2})
    assert len(ev.load(tmp_path / "m").blocks) == 2


def test_quantize_num_batches_leaves_the_config_alone() -> None:
    """num_batches limits calibration without changing the caller's config, and a bad count is a
    ConfigError before anything is quantized (it was written into the config after the check)."""
    data = [(torch.randn(16, 3, 32, 32), torch.zeros(16, dtype=torch.long)) for _ in range(3)]
    cfg = ev.QuantConfig(target="ort-cpu")
    report = ev.quantize(_micro(), cfg, calib=data, num_batches=2)
    assert report.calib_samples == 32 and cfg.calib_batches == 8  # two batches used; the default kept
    model = _micro()
    with pytest.raises(ev.ConfigError, match="calib_batches: at least 1"):
        ev.quantize(model, cfg, calib=data, num_batches=0)
    assert ev.spec_of(model).modes == []  # nothing quantized


def test_export_model_refuses_bad_options_before_writing(tmp_path: Path) -> None:
    """A misspelt or ill-typed ONNX option, an opset out of range, and dynamic H/W on a quantized
    model are ConfigErrors naming the option, and no output folder is made (a typo used to raise a
    bare TypeError; dynamic_hw was ignored for quantized models)."""
    ev.save(_micro(), tmp_path / "fp32")
    quantized = _micro()
    ev.quantize(quantized, ev.QuantConfig(target="ort-cpu"), calib=[torch.randn(16, 3, 32, 32)] * 2)
    ev.save(quantized, tmp_path / "int8")
    for model_dir, options, message in [
            ("fp32", {"opest": 18}, "unknown key 'export_model.opest'; did you mean 'opset'"),
            ("fp32", {"atol": "tight"}, "export_model.atol"),
            ("fp32", {"opset": 7}, "export_model.opset: 7 is outside"),
            ("int8", {"dynamic_hw": True}, "export_model.dynamic_hw: a quantized model")]:
        with pytest.raises(ev.ConfigError, match=re.escape(message)):
            ev.export_model(tmp_path / model_dir, tmp_path / "out", **options)
        assert not (tmp_path / "out").exists()
