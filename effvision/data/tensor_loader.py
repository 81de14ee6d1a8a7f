"""A device-resident loader for small datasets: decode once, keep uint8 images on the
training device, crop/flip/erase whole batches there.

A per-image PIL DataLoader cannot feed a small model on a GPU (baselines.md: 19.5k img/s on
one H100 needs the data on the device). timm's transforms work per PIL image, so the batched
crop and flip are written here; random erasing is timm's (it takes batches).

Randomness is a pure function of (seed, epoch, step): every batch's order and augmentation
can be recomputed, so a resumed run sees exactly the batches an uninterrupted one would, and
N processes together see the same global batch one process would.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator

import torch
from timm.data.random_erasing import RandomErasing

from .sources import ImageArrays

__all__ = ["TensorLoader", "step_seed"]


def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers; distinct tuples give unrelated seeds."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class TensorLoader:
    def __init__(self, data: ImageArrays, batch_size: int, *, train: bool, device: torch.device | str,
                 mean: tuple[float, ...], std: tuple[float, ...], crop_padding: int = 0, hflip: bool = False,
                 random_erasing: float = 0.0, seed: int = 0, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.device = torch.device(device)
        self.images = data.images.to(self.device)  # (N, C, H, W) uint8
        self.labels = data.labels.to(self.device)  # (N,)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.crop_padding, self.hflip, self.channels_last = crop_padding, hflip, channels_last
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        self.erasing = (RandomErasing(random_erasing, mode="pixel", device=str(self.device))
                        if train and random_erasing > 0 else None)
        # (epoch, step) -> the global batch's sample indices, replacing the shuffled order
        # (a curriculum's sampler, effvision.curriculum); None: the permutation.
        self.batch_indices: Callable[[int, int], torch.Tensor] | None = None
        # This process's sample indices of the batch yielded last (cached teacher logits look them up).
        self.last_indices: torch.Tensor | None = None

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self) * self.batch_size if self.train else len(self.labels)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of epoch ``epoch`` from step ``start_step`` on: (x (B, C, H, W) float, y (B,))."""
        n = len(self.labels)
        if self.train:
            g = torch.Generator().manual_seed(step_seed(self.seed, epoch))
            order = torch.randperm(n, generator=g).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        per_rank = self.batch_size // self.world_size if self.train else self.batch_size
        for step in range(start_step, len(self)):
            if self.batch_indices is not None and self.train:
                idx = self.batch_indices(epoch, step).to(self.device)
            else:
                idx = order[step * self.batch_size:(step + 1) * self.batch_size]  # the global batch
            x = self.images[idx]  # (B, C, H, W) uint8
            if self.train:
                seed = step_seed(self.seed, epoch, step)
                x = self._erase((self._augment(x, seed).float() - self.mean) / self.std, seed)
                lo = self.rank * per_rank
                x, idx = x[lo:lo + per_rank], idx[lo:lo + per_rank]
            else:
                x = (x.float() - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self.last_indices = idx
            yield x, self.labels[idx]

    def in_order(self, batch_size: int = 512) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every sample in index order, normalized, un-augmented (scoring a curriculum)."""
        for i in range(0, len(self.labels), batch_size):
            yield (self.images[i:i + batch_size].float() - self.mean) / self.std, self.labels[i:i + batch_size]

    def labels_in_order(self) -> torch.Tensor:
        return self.labels.cpu()

    def _erase(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """timm's RandomErasing on the whole global batch. It draws boxes from `random` and fill
        values from torch's global RNG: both are seeded here, torch's inside fork_rng so the
        trainer's own RNG stream (dropout, drop-path) is left as it was."""
        if self.erasing is None:
            return x
        random.seed(seed)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            return self.erasing(x)

    def _augment(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """Random crop after zero padding, and horizontal flip, for the whole batch at once."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        b, c, h, w = x.shape
        p = self.crop_padding
        if p > 0:
            padded = torch.nn.functional.pad(x, (p, p, p, p))  # (B, C, H+2p, W+2p)
            oy = torch.randint(0, 2 * p + 1, (b, 1), device=self.device, generator=g)
            ox = torch.randint(0, 2 * p + 1, (b, 1), device=self.device, generator=g)
            rows = (oy + torch.arange(h, device=self.device))[:, None, :, None]  # (B, 1, H, 1)
            cols = (ox + torch.arange(w, device=self.device))[:, None, None, :]  # (B, 1, 1, W)
            bi = torch.arange(b, device=self.device)[:, None, None, None]
            ci = torch.arange(c, device=self.device)[None, :, None, None]
            x = padded[bi, ci, rows, cols]  # (B, C, H, W)
        if self.hflip:
            flip = torch.rand(b, device=self.device, generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x
