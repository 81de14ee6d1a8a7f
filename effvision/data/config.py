"""Data section of a recipe."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError

__all__ = ["AugmentConfig", "DataConfig"]


@dataclass
class AugmentConfig:
    """Training-time augmentation: crop, flip, random erasing, AutoAugment, and Mixup/CutMix."""

    crop_padding: int = 4            # tensor loader: zero-pad then random crop back (CIFAR style)
    hflip: bool = True               # random horizontal flip
    random_erasing: float = 0.0      # timm RandomErasing probability
    auto_augment: str | None = None  # folder loader: timm policy string, e.g. 'rand-m9-mstd0.5-inc1'
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # folder loader: RandomResizedCrop scale
    mixup: float = 0.0               # timm Mixup alpha (0 = off)
    cutmix: float = 0.0              # timm CutMix alpha (0 = off)
    mix_prob: float = 1.0            # chance that a batch is mixed at all

    def validate(self, where: str) -> None:
        if not 0 <= self.random_erasing <= 1 or not 0 <= self.mix_prob <= 1:
            raise ConfigError(f"{where}: random_erasing and mix_prob are probabilities in [0, 1]")


@dataclass
class DataConfig:
    """The recipe's dataset (digits, CIFAR-10 or an ImageFolder tree): where it is, how it is
    loaded and batched, which splits and how many samples, normalization and augmentation."""

    name: Literal["digits", "cifar10", "imagefolder"] = "digits"
    root: str | None = None          # folder, or a .tar.gz of the ImageFolder tree (cifar10, imagefolder)
    download: bool = False           # cifar10 via torchvision when root is missing (needs network)
    img_size: int = 32
    batch_size: int = 128            # global batch: split across torchrun processes
    eval_batch_size: int = 512
    loader: Literal["auto", "tensor", "folder"] = "auto"  # auto: tensor for digits/cifar10
    num_workers: int = 2             # folder loader only
    train_split: str = "train"
    eval_split: str = "test"
    limit_train: int | None = None   # use only the first N training samples (class-balanced)
    limit_eval: int | None = None
    holdout: int = 0                 # training images (class-balanced) held out as a validation split
    mean: list[float] | None = None  # defaults: the model's pretrained_cfg
    std: list[float] | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self, where: str) -> None:
        if self.name != "digits" and self.root is None and not self.download:
            raise ConfigError(f"{where}.root: dataset '{self.name}' needs a root folder or archive")
        if self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise ConfigError(f"{where}: batch sizes must be positive")
        if self.img_size <= 0:
            raise ConfigError(f"{where}.img_size must be positive")
        if self.holdout < 0:
            raise ConfigError(f"{where}.holdout must be >= 0 (training images held out for validation)")
        for key in ("limit_train", "limit_eval"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be positive (or left out)")
