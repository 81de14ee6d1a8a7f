"""Large datasets: files decoded per sample by DataLoader workers, augmented with timm's
create_transform (RandomResizedCrop, RandAugment, random erasing), in a resumable order.

Same interface as TensorLoader: ``len()``, ``num_samples`` and ``epoch(epoch, start_step)``.
The sample order is a pure function of (seed, epoch), so a resumed stage restarts at the
right sample; per-sample augmentation inside workers is seeded per (epoch, start) and is
not bit-identical across a resume, unlike the tensor path.
"""
from __future__ import annotations

import signal
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .tensor_loader import step_seed

__all__ = ["FolderLoader", "OrderSampler"]


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers outlive a SIGTERM sent to the whole job: the trainer finishes its step and
    checkpoints first (engine/preemption.py), and torch stops the workers when it exits."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


class OrderSampler(Sampler[int]):
    """This rank's share of a (seed, epoch)-determined order, from sample ``start`` on."""

    def __init__(self, n: int, global_batch: int, shuffle: bool, seed: int, rank: int, world_size: int) -> None:
        self.n, self.global_batch, self.shuffle, self.seed = n, global_batch, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_step = 0, 0
        self.batch_indices: Callable[[int, int], torch.Tensor] | None = None  # see TensorLoader.batch_indices

    def _global_order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(step_seed(self.seed, self.epoch)))

    def __iter__(self) -> Iterator[int]:
        order = self._global_order()
        per_rank = self.global_batch // self.world_size
        steps = self.n // self.global_batch if self.shuffle else -(-self.n // self.global_batch)
        for step in range(self.start_step, steps):
            if self.batch_indices is not None and self.shuffle:
                batch = self.batch_indices(self.epoch, step)
            else:
                batch = order[step * self.global_batch:(step + 1) * self.global_batch]
            yield from batch[self.rank * per_rank:(self.rank + 1) * per_rank].tolist() if self.shuffle else batch.tolist()

    def __len__(self) -> int:
        steps = self.n // self.global_batch if self.shuffle else -(-self.n // self.global_batch)
        per = self.global_batch // self.world_size if self.shuffle else self.global_batch
        return max(0, steps - self.start_step) * per


class FolderLoader:
    def __init__(self, dataset: Dataset, batch_size: int, *, train: bool, num_workers: int, seed: int,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 channels_last: bool = False, plain: Callable[[], Dataset] | None = None) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.dataset, self.batch_size, self.train = dataset, batch_size, train
        self.device, self.channels_last, self.seed, self.rank = torch.device(device), channels_last, seed, rank
        self.sampler = OrderSampler(len(dataset), batch_size, train, seed, rank, world_size if train else 1)
        self.num_workers = num_workers
        self.plain = plain  # the same samples with the eval transform (built on demand: scoring a curriculum)
        self.per_rank = batch_size // world_size if train else batch_size

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self) * self.batch_size if self.train else len(self.dataset)

    @property
    def batch_indices(self) -> Callable[[int, int], torch.Tensor] | None:
        return self.sampler.batch_indices

    @batch_indices.setter
    def batch_indices(self, fn: Callable[[int, int], torch.Tensor] | None) -> None:
        self.sampler.batch_indices = fn

    def in_order(self, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every training sample in index order through the eval transform (scoring a curriculum)."""
        if self.plain is None:
            raise ValueError("this FolderLoader has no un-augmented view (plain)")
        loader = DataLoader(self.plain(), batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
                            worker_init_fn=_ignore_stop_signals)
        for x, y in loader:
            yield x.to(self.device), y.to(self.device)

    def labels_in_order(self) -> torch.Tensor:
        return torch.tensor(self.dataset.targets)  # type: ignore[attr-defined]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.epoch, self.sampler.start_step = epoch, start_step
        loader = DataLoader(self.dataset, batch_size=self.per_rank, sampler=self.sampler,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(step_seed(self.seed, epoch, start_step, self.rank)),
                            persistent_workers=False, drop_last=False, worker_init_fn=_ignore_stop_signals)
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)

