"""Datasets as decoded uint8 arrays (small data) or file lists (large data).

- ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, upsampled to 32x32 RGB,
  fixed stratified split; ships with scikit-learn, no download.
- ``cifar10``: ImageFolder layout root/{train,test}/<class>/*.jpg, a .tar.gz of that layout,
  or torchvision's downloader when ``download`` is set and the machine is online.
- ``imagefolder``: any ImageNet-style root/{train,val}/<class>/* tree.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file

from ..errors import EffVisionError

__all__ = ["ImageArrays", "digits", "decode_imagefolder", "decode_archive", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class ImageArrays:
    """A split held in memory: images (N, C, H, W) uint8, labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, limit: int | None) -> "ImageArrays":
        """The first ``limit`` samples of a class-interleaved order (keeps classes balanced)."""
        if limit is None or limit >= len(self):
            return self
        keep = balanced_indices(self.labels, limit)
        return ImageArrays(self.images[keep], self.labels[keep], self.classes)


def balanced_indices(labels: torch.Tensor, limit: int) -> torch.Tensor:
    """Sorted indices of the first ``limit`` samples when classes take turns (0, 1, ..., 0, 1, ...)."""
    num_classes = int(labels.max()) + 1
    order = torch.argsort(_rank_within_class(labels) * num_classes + labels, stable=True)
    return order[:limit].sort().values


def _rank_within_class(labels: torch.Tensor) -> torch.Tensor:
    rank = torch.empty_like(labels)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        rank[idx] = torch.arange(len(idx))
    return rank


def digits(img_size: int = 32) -> dict[str, ImageArrays]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)
    y = torch.from_numpy(d.target).long()
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.25, stratify=d.target, random_state=0)
    classes = [str(i) for i in range(10)]
    return {
        "train": ImageArrays(x[train_idx], y[train_idx], classes),
        "test": ImageArrays(x[test_idx], y[test_idx], classes),
    }


def _decode(data: bytes, size: int | None, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            return np.asarray(im)  # (H, W, 3)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise EffVisionError(f"cannot decode image {name}: {e}") from e


def _stack(arrays: list[np.ndarray], labels: list[int], classes: list[str]) -> ImageArrays:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise EffVisionError(f"images differ in size ({sorted(shapes)[:3]}...); set data.img_size to resize them")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    return ImageArrays(x, torch.tensor(labels, dtype=torch.long), classes)


def _list_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    if not root.is_dir():
        raise EffVisionError(f"dataset folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise EffVisionError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    files, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
                labels.append(i)
    if not files:
        raise EffVisionError(f"no images in {root}")
    return files, labels, classes


def decode_imagefolder(root: str | Path, img_size: int | None = None, cache_dir: str | Path | None = None,
                       workers: int | None = None, limit: int | None = None) -> ImageArrays:
    """Decode an ImageFolder split once into uint8 arrays, cached as safetensors; with ``limit``
    only that class-balanced subset (ImageArrays.subset's choice) is decoded."""
    root = Path(root)
    files, labels, classes = _list_folder(root)
    key = hashlib.sha256(f"{root.resolve()}|{len(files)}|{files[-1]}|{img_size}|{limit}".encode()).hexdigest()[:16]
    if limit is not None and limit < len(files):
        keep = balanced_indices(torch.tensor(labels), limit).tolist()
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    cache = Path(cache_dir) / f"{root.name}-{key}.safetensors" if cache_dir else None
    if cache is not None and cache.is_file():
        t = load_file(str(cache))
        return ImageArrays(t["images"], t["labels"], classes)
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        arrays = list(pool.map(lambda f: _decode(f.read_bytes(), img_size, str(f)), files, chunksize=256))
    out = _stack(arrays, labels, classes)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_file({"images": out.images, "labels": out.labels}, str(tmp))
        tmp.replace(cache)
    return out


def decode_archive(path: str | Path, img_size: int | None = None, workers: int | None = None) -> dict[str, ImageArrays]:
    """Decode every split of a tar(.gz) of an ImageFolder tree (``<top>/<split>/<class>/<file>``)
    in one sequential pass over the archive, decoding in a thread pool."""
    path = Path(path)
    if not path.is_file():
        raise EffVisionError(f"dataset archive not found: {path}")
    entries: dict[str, list[tuple[str, bytes, str]]] = {}  # split -> (class, bytes, member name)
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                parts = Path(m.name).parts
                if not m.isfile() or len(parts) < 3 or Path(m.name).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                split, cls = parts[-3], parts[-2]
                f = tar.extractfile(m)
                assert f is not None
                entries.setdefault(split, []).append((cls, f.read(), m.name))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise EffVisionError(f"corrupt dataset archive {path}: {e}") from e
    if not entries:
        raise EffVisionError(f"no images in archive {path} (expected <top>/<split>/<class>/<image>)")
    out = {}
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        for split, items in entries.items():
            classes = sorted({c for c, _, _ in items})
            index = {c: i for i, c in enumerate(classes)}
            arrays = list(pool.map(lambda it: _decode(it[1], img_size, f"{path}:{it[2]}"), items, chunksize=256))
            out[split] = _stack(arrays, [index[c] for c, _, _ in items], classes)
    return out


def torchvision_cifar10(root: str | Path) -> dict[str, ImageArrays]:
    """CIFAR-10 through torchvision's downloader (needs a network)."""
    from torchvision.datasets import CIFAR10

    out = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = CIFAR10(str(root), train=train, download=True)
        except Exception as e:  # network errors come in many types
            raise EffVisionError(f"could not download CIFAR-10 to {root}: {e}") from e
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        out[split] = ImageArrays(x, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes))
    return out
