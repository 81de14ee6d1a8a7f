"""`effvision deploy --target cpu`: the runtime race on a real (tiny) timm ViT, its real runtimes
(onnxruntime, PyTorch), real files; the winner is checked against the PyTorch model itself."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import effvision as ev
import effvision.models  # noqa: F401
from effvision.cli import main
from effvision.export.race import RaceConfig, Thresholds, run_race

FAST = dict(rounds=2, warmup=1, iters=2, calib_images=16, check_images=16, threads=1)
CONTENDERS = ["ort-fp32", "ort-int8-dynamic", "torch-eager"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("vit_micro_patch4_32", num_classes=10)
    return ev.save(model, tmp_path_factory.mktemp("race") / "model")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _race(model_dir: Path, out: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, **kw) -> dict:
    monkeypatch.setenv("EFFVISION_CACHE", str(cache))
    return run_race(model_dir, out, RaceConfig(**{**FAST, "contenders": CONTENDERS, "batch_sizes": [1, 4], **kw}))


def test_winner_is_the_fastest_and_runs_like_the_model(model_dir, cache, tmp_path, monkeypatch):
    report = _race(model_dir, tmp_path / "out", cache, monkeypatch)
    raced = {n: e for n, e in report["contenders"].items() if "timings" in e}
    assert set(raced) == set(CONTENDERS)
    for b in ("1", "4"):
        fastest = max(raced, key=lambda n: statistics_median(raced[n]["timings"][b]["rounds_img_per_s"]))
        assert report["winners"][b] == fastest
        folder = tmp_path / "out" / f"batch-{b}"
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["race_winner"]["contender"] == fastest
        for name, meta in manifest["files"].items():  # the shipped files are the checked ones
            assert (folder / name).stat().st_size == meta["bytes"]
    # the batch-1 winner's files, run on their own, give the PyTorch model's logits
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = ev.load(model_dir)(x).numpy()
    winner = tmp_path / "out" / "batch-1"
    if (winner / "model.onnx").is_file():
        import onnxruntime as ort

        sess = ort.InferenceSession(str(winner / "model.onnx"), providers=["CPUExecutionProvider"])
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    else:
        with torch.no_grad():
            out = ev.load(winner)(x).numpy()
    sqnr = 10 * np.log10((ref ** 2).sum() / max(((out - ref) ** 2).sum(), 1e-30))
    assert sqnr >= (60 if report["contenders"][report["winners"]["1"]]["precision"] == "fp32" else 15)
    for name in ("race.json", "race.md", "race.png"):
        assert (tmp_path / "out" / name).is_file()
    # every contender's check: fp32 forms agree with the model to float rounding, INT8 is lossy
    assert raced["ort-fp32"]["checks"]["sqnr_db"] > 60
    assert 15 <= raced["ort-int8-dynamic"]["checks"]["sqnr_db"] < 60


def statistics_median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def test_rerun_reads_the_recorded_timings(model_dir, cache, tmp_path, monkeypatch):
    first = _race(model_dir, tmp_path / "a", cache, monkeypatch, contenders=["ort-fp32", "torch-eager"])
    again = _race(model_dir, tmp_path / "b", cache, monkeypatch, contenders=["ort-fp32", "torch-eager"])
    assert again["timings"]["reused"] and again["winners"] == first["winners"]
    assert again["contenders"]["torch-eager"]["timings"] == first["contenders"]["torch-eager"]["timings"]
    fresh = _race(model_dir, tmp_path / "c", cache, monkeypatch, contenders=["ort-fp32", "torch-eager"],
                  remeasure=True)
    assert not fresh["timings"]["reused"]
    assert fresh["contenders"]["ort-fp32"]["timings"] != first["contenders"]["ort-fp32"]["timings"]


def test_int8_failing_every_check_ships_fp32(model_dir, cache, tmp_path, monkeypatch):
    strict = Thresholds(min_sqnr_db={"fp32": 40.0, "int8": 500.0})
    report = _race(model_dir, tmp_path / "out", cache, monkeypatch, contenders=["ort-fp32", "ort-int8-dynamic"],
                   thresholds=strict)
    assert report["winners"] == {"1": "ort-fp32", "4": "ort-fp32"}
    assert "SQNR" in report["int8"]["why"]["ort-int8-dynamic"]
    assert "No INT8 contender passed" in (tmp_path / "out" / "race.md").read_text()


def test_executorch_contender_runs_the_model(model_dir, cache, tmp_path, monkeypatch):
    pytest.importorskip("executorch", reason="the executorch extra is not installed")
    report = _race(model_dir, tmp_path / "out", cache, monkeypatch, contenders=["ort-fp32", "executorch-xnnpack"],
                   batch_sizes=[4])
    entry = report["contenders"]["executorch-xnnpack"]
    assert entry["status"] == "passed", entry.get("reason")
    assert entry["checks"]["sqnr_db"] > 60 and "4" in entry["timings"]


def _cli(*argv: str, capsys) -> tuple[int, str]:
    code = main(["deploy", *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "batch sizes must be at least 1"),
    (["--contenders", "tensorflow-lite"], "unknown contender tensorflow-lite"),
    (["--calib-images", "4"], "at least 16 images"),
])
def test_bad_input_is_one_line_and_writes_nothing(model_dir, tmp_path, capsys, extra, message):
    code, err = _cli(str(model_dir), "--out", str(tmp_path / "out"), *extra, capsys=capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_existing_out_and_bad_arrays_are_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _cli(str(model_dir), "--out", str(out), capsys=capsys)
    assert code == 2 and "exists already" in err and (out / "keep.txt").read_text() == "mine"
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((80, 3, 64, 64), np.float32))
    code, err = _cli(str(model_dir), "--out", str(tmp_path / "o2"), "--data", str(wrong),
                     "--contenders", "ort-fp32", capsys=capsys)
    assert code == 2 and "(80, 3, 64, 64)" in err and "(N, 3, 32, 32)" in err
    few = tmp_path / "few.npy"
    np.save(few, np.zeros((20, 3, 32, 32), np.float32))
    code, err = _cli(str(model_dir), "--out", str(tmp_path / "o3"), "--data", str(few),
                     "--contenders", "ort-fp32", capsys=capsys)
    assert code == 2 and "holds 20 images" in err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_missing_runtime_names_the_extra(model_dir, tmp_path):
    """In a process where nncf cannot be imported (blocked in sys.modules, as if not installed)."""
    code = ("import sys; sys.modules['nncf'] = None; from effvision.cli import main; "
            f"sys.exit(main(['deploy', {str(model_dir)!r}, '--out', {str(tmp_path / 'out')!r}, "
            "'--contenders', 'openvino-int8-nncf']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "pip install 'effvision[openvino]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_image_folder_calibrates_on_train_and_checks_on_test():
    """CIFAR-10's ImageFolder tree: calibration from train/, checks from test/ with their labels,
    normalized with the model's mean and std (pixel 0 -> -mean/std)."""
    from effvision.export.race.checks import race_images

    root = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"
    if not (root / "train").is_dir():
        pytest.skip(f"{root} is absent (../shared/datasets/cifar10)")
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.25, 0.25)
    images = race_images(root, (3, 32, 32), mean, std, 16, 20)
    assert images.calibration.shape == (16, 3, 32, 32) and images.check.shape == (20, 3, 32, 32)
    assert images.labels is not None and len(set(images.labels.tolist())) == 10  # class-balanced test images
    assert "train" in images.source and "test" in images.source
    lo = (0 - np.array(mean)) / np.array(std)
    hi = (1 - np.array(mean)) / np.array(std)
    assert (images.check.min(axis=(0, 2, 3)) >= lo - 1e-6).all() and (images.check.max(axis=(0, 2, 3)) <= hi + 1e-6).all()
