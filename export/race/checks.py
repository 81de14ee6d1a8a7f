"""What each contender is checked on, and the check: its logits against the fp32 PyTorch model's
on held-out images, by top-1 agreement and logit SQNR (signal-to-quantization-noise ratio,
10 log10(sum ref^2 / sum (out - ref)^2)).

Images come from ``--data``: an ImageFolder tree (``train/`` calibrates and ``val/`` or
``test/`` checks where the tree has them, else one folder split in two), or a ``.npy`` array
(N, C, H, W) already normalized. Without data the images are Gaussian noise: the SQNR check
still catches a broken graph, but agreement on noise says nothing, so it is not applied (the
manifest says so).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from effvision.errors import EffVisionError

__all__ = ["Thresholds", "RaceImages", "race_images", "check", "MIN_CALIBRATION"]

MIN_CALIBRATION = 16  # fewer images give activation ranges that one outlier sets


@dataclass
class Thresholds:
    """A contender passes when SQNR >= min_sqnr_db and (on real images) agreement >= min_agreement.
    fp32: another runtime of the same float graph is ~1e-6 off (SQNR > 100 dB); 40 dB only
    refuses a wrong graph. INT8: 15 dB is where a graph is broken rather than rounded (a broken
    graph is ~0 dB); 0.9 top-1 agreement bounds what INT8 may change."""

    min_sqnr_db: dict[str, float] = field(default_factory=lambda: {"fp32": 40.0, "int8": 15.0})
    min_agreement: dict[str, float] = field(default_factory=lambda: {"fp32": 0.99, "int8": 0.90})


@dataclass
class RaceImages:
    calibration: np.ndarray          # (N, C, H, W) float32
    check: np.ndarray                # (M, C, H, W) float32
    labels: np.ndarray | None        # (M,) where the data has them
    source: str                      # what they are, for the manifest


def _normalize(images: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    x = images.numpy().astype(np.float32) / 255.0  # (N, C, H, W) from uint8
    return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


def _folder_split(root: Path, img_size: int, n: int) -> tuple[Any, Any]:
    from effvision.data.sources import decode_imagefolder

    arrays = decode_imagefolder(root, img_size, limit=n)
    return arrays.images, arrays.labels


def race_images(data: str | Path | None, shape: tuple[int, int, int], mean: tuple[float, ...],
                std: tuple[float, ...], n_calibration: int, n_check: int, seed: int = 0) -> RaceImages:
    if n_calibration < MIN_CALIBRATION:
        raise EffVisionError(f"calibration needs at least {MIN_CALIBRATION} images, asked for {n_calibration}")
    if data is None:
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal((n_calibration + n_check, *shape), dtype=np.float32)
        return RaceImages(noise[:n_calibration], noise[n_calibration:], None, "gaussian noise (no --data)")
    path = Path(data)
    if path.suffix == ".npy":
        if not path.is_file():
            raise EffVisionError(f"calibration array not found: {path}")
        arr = np.load(path, allow_pickle=False)
        if arr.ndim != 4 or tuple(arr.shape[1:]) != shape:
            raise EffVisionError(f"{path} holds an array of shape {tuple(arr.shape)}; the model takes (N, "
                                 f"{', '.join(map(str, shape))})")
        if len(arr) < n_calibration + n_check:
            raise EffVisionError(f"{path} holds {len(arr)} images; the race needs {n_calibration} for calibration "
                                 f"+ {n_check} to check (lower --calib-images/--check-images or give more)")
        arr = arr.astype(np.float32)
        return RaceImages(arr[:n_calibration], arr[n_calibration:n_calibration + n_check], None, f"array {path}")
    if not path.is_dir():
        raise EffVisionError(f"--data {path}: neither an image folder nor a .npy array")
    if shape[0] != 3:
        raise EffVisionError(f"the model takes {shape[0]}-channel input; image folders decode to RGB (give a "
                             f".npy array of shape (N, {', '.join(map(str, shape))}))")
    held_out = next((path / s for s in ("val", "test") if (path / s).is_dir()), None)
    if (path / "train").is_dir() and held_out is not None:
        cal, _ = _folder_split(path / "train", shape[1], n_calibration)
        chk, labels = _folder_split(held_out, shape[1], n_check)
        source = f"calibration: {path / 'train'}, check: {held_out}"
    else:
        images, labels_all = _folder_split(path, shape[1], n_calibration + n_check)
        cal, chk, labels = images[:n_calibration], images[n_calibration:], labels_all[n_calibration:]
        source = f"{path} (split in two)"
    if len(cal) < n_calibration or len(chk) < n_check:
        raise EffVisionError(f"--data {path} has {len(cal)} calibration and {len(chk)} check images; the race "
                             f"needs {n_calibration} and {n_check} (lower --calib-images/--check-images)")
    return RaceImages(_normalize(cal, mean, std), _normalize(chk, mean, std), labels.numpy(), source)


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    noise = float(((out.astype(np.float64) - ref) ** 2).sum())
    return float("inf") if noise == 0 else float(10 * np.log10(float((ref.astype(np.float64) ** 2).sum()) / noise))


def check(ref: np.ndarray, out: np.ndarray, precision: str, images: RaceImages, limits: Thresholds
          ) -> dict[str, Any]:
    """The contender's record against the fp32 reference; ``passed`` False names the reason."""
    sqnr = sqnr_db(ref, out)
    agree = float((out.argmax(1) == ref.argmax(1)).mean())
    result: dict[str, Any] = {"sqnr_db": sqnr, "top1_agreement": agree, "images": len(ref),
                              "min_sqnr_db": limits.min_sqnr_db[precision]}
    if images.labels is not None:
        result["top1"] = float((out.argmax(1) == images.labels).mean())
        result["fp32_top1"] = float((ref.argmax(1) == images.labels).mean())
        result["min_agreement"] = limits.min_agreement[precision]
    reasons = []
    if not sqnr >= limits.min_sqnr_db[precision]:
        reasons.append(f"logit SQNR {sqnr:.1f} dB < {limits.min_sqnr_db[precision]:g} dB")
    if images.labels is not None and agree < limits.min_agreement[precision]:
        reasons.append(f"top-1 agreement {agree:.1%} < {limits.min_agreement[precision]:.0%}")
    result["passed"] = not reasons
    if reasons:
        result["reason"] = "; ".join(reasons)
    return result
