"""Cached teacher logits for distillation (``distill.cache_logits: true``).

The teacher runs once over the un-augmented training set, in index order; its logits are kept
in ``RUN/distill/logits-<key>.safetensors`` (the key hashes the teacher's files, the training
labels and the teacher-input mapping) and every training step then looks its batch up by
sample index instead of running the teacher. On a CPU, where the teacher's forward can cost as
much as the student's step, this makes distillation as cheap as training alone, and several
runs against one teacher (students at several sizes, alone vs distilled) pay for it once.

With crop/flip augmentation on, the student's view differs slightly from the image the teacher
saw (the un-augmented one), as with any offline label cache (e.g. ReLabel, FKD without crop
records); with augmentation off the cached logits are exactly the teacher's.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..engine.distributed import cached_tensor
from ..io import hash_files

__all__ = ["teacher_logits", "CachedTeacher"]


@torch.no_grad()
def _compute(teacher: nn.Module, adapt: nn.Module, loader: Any, device: torch.device) -> torch.Tensor:
    from tqdm import tqdm

    teacher = teacher.to(device).eval()
    out = []
    n = len(loader.labels_in_order())
    with tqdm(total=n, desc="teacher logits", unit="img", leave=False) as bar:
        for x, _ in loader.in_order():
            out.append(teacher(adapt(x.to(device))).float().cpu())  # (b, K)
            bar.update(len(x))
    return torch.cat(out)  # (N, K)


def teacher_logits(teacher: nn.Module, teacher_files: Path | str, adapt: nn.Module, loader: Any,
                   device: torch.device, cache_dir: Path, is_main: bool = True) -> tuple[torch.Tensor, Path]:
    """(N, K) logits of ``teacher`` on the training set in index order, and the cache file.
    ``teacher_files``: the teacher's model dir (hashed) or its timm name."""
    if not hasattr(loader, "labels_in_order") or not hasattr(loader, "last_indices"):
        raise ConfigError("distill.cache_logits needs the tensor loader (data.loader: tensor), which knows each "
                          "batch's sample indices")
    h = hashlib.sha256()
    if Path(teacher_files).is_dir():
        hash_files(h, teacher_files)
    else:
        h.update(str(teacher_files).encode())
    h.update(loader.labels_in_order().numpy().tobytes())
    h.update(repr(sorted((k, v.tolist()) for k, v in adapt.state_dict().items())).encode())
    h.update(repr(getattr(adapt, "size", None)).encode())
    path = Path(cache_dir) / f"logits-{h.hexdigest()[:16]}.safetensors"
    fresh = not path.is_file()
    logits = cached_tensor(path, "logits", lambda: _compute(teacher, adapt, loader, device), is_main=is_main,
                           metadata={"teacher": str(teacher_files)})
    if fresh and is_main:
        print(f"distill: cached teacher logits of {len(logits)} training images -> {path}")
    return logits, path


class CachedTeacher(nn.Module):
    """Stands in for the teacher: returns the cached logits of the batch the loader yielded last
    (``loader.last_indices``: this process's sample indices). A batch ramp keeps a prefix of the
    batch, so the first ``B`` indices are the rows of a batch of ``B``."""

    def __init__(self, logits: torch.Tensor, loader: Any) -> None:
        super().__init__()
        self.register_buffer("logits", logits, persistent=False)  # (N, K)
        self.loader = loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        idx = self.loader.last_indices
        if idx is None or len(idx) < x.shape[0]:
            raise RuntimeError("CachedTeacher: the loader has not yielded this batch (no sample indices)")
        return self.logits[idx[:x.shape[0]].to(self.logits.device)]
