"""Recipe data section -> train and eval loaders."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torchvision.datasets import ImageFolder

from ..errors import EffVisionError
from .config import DataConfig
from .folder_loader import FolderLoader
from .sources import ImageArrays, balanced_indices, decode_archive, decode_imagefolder, digits, torchvision_cifar10
from .tensor_loader import TensorLoader

__all__ = ["DataInfo", "Loaders", "build_loaders", "hold_out", "load_arrays", "CACHE_DIR"]

CACHE_DIR = Path.home() / ".cache" / "effvision"
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


@dataclass
class DataInfo:
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_size: int


@dataclass
class Loaders:
    train: TensorLoader | FolderLoader
    eval: TensorLoader | FolderLoader
    info: DataInfo
    # data.holdout: training images kept out of training, for choices that must not see the
    # test split (an early-exit threshold); None without a holdout
    val: TensorLoader | None = None


def _is_archive(root: str | None) -> bool:
    return root is not None and root.endswith(_ARCHIVE_SUFFIXES)


def load_arrays(cfg: DataConfig) -> dict[str, ImageArrays]:
    """Both splits as uint8 arrays (the tensor loader's input)."""
    if cfg.name == "digits":
        splits = digits(cfg.img_size)
    elif _is_archive(cfg.root):
        splits = decode_archive(cfg.root, cfg.img_size)  # type: ignore[arg-type]
    elif cfg.root is not None and Path(cfg.root).exists():
        root = Path(cfg.root)
        limits = {cfg.train_split: cfg.limit_train, cfg.eval_split: cfg.limit_eval}
        splits = {s: decode_imagefolder(root / s, cfg.img_size, CACHE_DIR, limit=n) for s, n in limits.items()}
    elif cfg.name == "cifar10" and cfg.download:
        splits = torchvision_cifar10(cfg.root or CACHE_DIR / "cifar10")
    else:
        raise EffVisionError(f"dataset not found: {cfg.root} (data.root of '{cfg.name}')")
    for s in (cfg.train_split, cfg.eval_split):
        if s not in splits:
            raise EffVisionError(f"dataset '{cfg.name}' has no split '{s}' (has: {', '.join(sorted(splits))})")
    return {cfg.train_split: splits[cfg.train_split].subset(cfg.limit_train),
            cfg.eval_split: splits[cfg.eval_split].subset(cfg.limit_eval)}


def hold_out(data: ImageArrays, n: int) -> tuple[ImageArrays, ImageArrays]:
    """(the rest, ``n`` class-balanced samples): disjoint, the same ones on every run."""
    if n >= len(data):
        raise EffVisionError(f"data.holdout {n} leaves no training images (the split has {len(data)})")
    held = balanced_indices(data.labels.flip(0), n)  # taken from the end, so limit_train's head stays put
    held = (len(data) - 1 - held).sort().values
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[held] = False
    return (ImageArrays(data.images[keep], data.labels[keep], data.classes),
            ImageArrays(data.images[held], data.labels[held], data.classes))


def build_loaders(cfg: DataConfig, *, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                  seed: int, rank: int = 0, world_size: int = 1, channels_last: bool = False) -> Loaders:
    mean = tuple(cfg.mean or mean)
    std = tuple(cfg.std or std)
    kind = cfg.loader if cfg.loader != "auto" else ("folder" if cfg.name == "imagefolder" else "tensor")
    aug = cfg.augment
    if kind == "tensor":
        splits = load_arrays(cfg)
        train, ev = splits[cfg.train_split], splits[cfg.eval_split]
        if train.classes != ev.classes:
            raise EffVisionError(f"train and eval splits have different classes: {train.classes} vs {ev.classes}")
        common = dict(device=device, mean=mean, std=std, seed=seed, channels_last=channels_last)
        val = None
        if cfg.holdout:
            train, held = hold_out(train, cfg.holdout)
            val = TensorLoader(held, cfg.eval_batch_size, train=False, **common)
        return Loaders(
            TensorLoader(train, cfg.batch_size, train=True, crop_padding=aug.crop_padding, hflip=aug.hflip,
                         random_erasing=aug.random_erasing, rank=rank, world_size=world_size, **common),
            TensorLoader(ev, cfg.eval_batch_size, train=False, **common),
            DataInfo(train.classes, mean, std, cfg.img_size), val)
    if cfg.holdout:
        raise EffVisionError("data.holdout needs the tensor loader (digits, cifar10); give an ImageFolder its own "
                             "validation folder instead")
    if cfg.root is None or not Path(cfg.root).is_dir():
        raise EffVisionError(f"dataset folder not found: {cfg.root} (the folder loader reads an ImageFolder tree)")
    from timm.data import create_transform

    root = Path(cfg.root)
    for s in (cfg.train_split, cfg.eval_split):
        if not (root / s).is_dir():
            raise EffVisionError(f"dataset folder not found: {root / s}")
    t_train = create_transform(cfg.img_size, is_training=True, auto_augment=aug.auto_augment, scale=tuple(aug.scale),
                               hflip=0.5 if aug.hflip else 0.0, re_prob=aug.random_erasing, mean=mean, std=std)
    t_eval = create_transform(cfg.img_size, is_training=False, mean=mean, std=std,
                              crop_pct=1.0 if cfg.img_size <= 64 else None)
    ds_train, ds_eval = ImageFolder(str(root / cfg.train_split), t_train), ImageFolder(str(root / cfg.eval_split), t_eval)
    common = dict(num_workers=cfg.num_workers, seed=seed, device=device, channels_last=channels_last)
    plain = partial(ImageFolder, str(root / cfg.train_split), t_eval)  # curriculum scoring: un-augmented
    return Loaders(
        FolderLoader(ds_train, cfg.batch_size, train=True, rank=rank, world_size=world_size, plain=plain, **common),
        FolderLoader(ds_eval, cfg.eval_batch_size, train=False, **common),
        DataInfo(list(ds_train.classes), mean, std, cfg.img_size))
