"""torchrun integration: one process per device, DDP over gloo (CPU) or NCCL (GPU); a tensor
computed once by rank 0 and read by every rank (``cached_tensor``)."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "barrier", "all_reduce_mean", "any_rank", "broadcast_object", "shutdown",
           "cached_tensor"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (WORLD_SIZE > 1); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        # Non-distributed stages (export, bench) and evaluation run on rank 0 while the others
        # wait in a barrier: allow them far longer than NCCL's 10-minute default.
        dist.init_process_group(backend, timeout=timedelta(hours=2))
    return info


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (the object itself for one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (the flag itself for one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def cached_tensor(path: Path, name: str, compute: Callable[[], torch.Tensor], *, is_main: bool = True,
                  metadata: dict[str, str] | None = None) -> torch.Tensor:
    """Tensor ``name`` stored in ``path`` (safetensors; name it by a hash of what it depends on); when
    absent, rank 0 computes and writes it (temp file, then rename) and every rank reads it after
    a barrier, so all ranks hold the same values."""
    from safetensors.torch import load_file, save_file

    if not path.is_file() and is_main:
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({name: value}, str(tmp), metadata=metadata)
        tmp.replace(path)
    barrier()
    return load_file(str(path))[name]
