"""Curriculum learning (DeepSpeed Data Efficiency): the training data starts easy and gets
harder on a pacing schedule.

Two difficulty metrics, one ``curriculum:`` block of a train/finetune stage:
- ``resolution``: progressive resizing. Every training batch is resized on the fly to the
  current size (from ``start`` x img_size up to img_size). ViTs take the smaller inputs
  through timm's dynamic_img_size (position embeddings interpolated; switched on in place,
  the weights and state-dict keys do not change); CNNs take them as they are.
- ``loss``: per-sample difficulty = the loss of a reference model (a run or model dir) on the
  un-augmented training image, computed once and cached in the run dir. Each batch is drawn
  from the easiest ``start`` .. 1 fraction of the training set (the pool grows by the pacing).

``batch_ramp:`` (Cramming-style, mostly with ``budget_s``): each step trains on the first
``start`` .. 1 fraction of its batch, growing in ``buckets`` sizes; small batches early buy
more updates per second while the loss falls fast.

Pacing (``linear``, ``root``, ``discrete``) maps the schedule position to a fraction of the
way from ``start`` to full difficulty over ``steps`` (0: the first half of the run). The
position is the step, or under ``budget_s`` the spent budget (the trainer's clock). Every
batch is a function of (seed, epoch, step): SIGKILL + ``--resume`` sees the same batches.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.tensor_loader import step_seed
from ..errors import ConfigError
from ..engine.distributed import cached_tensor
from ..io import hash_files

if TYPE_CHECKING:
    from ..engine.distributed import DistInfo
    from ..engine.hooks import Hooks
    from ..models.io import ModelSpec
    from ..data.build import Loaders

__all__ = ["BatchRampConfig", "CurriculumConfig", "CurriculumLoader", "apply_curriculum", "check_curriculum",
           "check_reference", "pacing", "ramp_batch", "reference_model_dir", "resolutions", "setup_curriculum",
           "preflight_curriculum"]


@dataclass
class CurriculumConfig:
    metric: Literal["resolution", "loss"] = "resolution"
    pacing: Literal["linear", "root", "discrete"] = "linear"
    start: float = 0.5               # starting difficulty: fraction of img_size, or of the easiest samples
    steps: int = 0                   # steps until full difficulty (0: the first half of the run)
    root_degree: float = 2.0         # root pacing: fraction = (t / steps) ** (1 / root_degree)
    levels: int = 4                  # discrete pacing: distinct difficulty levels, start .. full
    size_step: int = 0               # resolution: sizes are multiples of it (0: the patch size; 8 for CNNs)
    reference: str | None = None     # loss: the reference model ("01-train" of this run, a run, stage or model dir)

    def validate(self, where: str) -> None:
        if not 0 < self.start <= 1:
            raise ConfigError(f"{where}.start must be in (0, 1] (a fraction of full difficulty)")
        if self.steps < 0:
            raise ConfigError(f"{where}.steps must be non-negative")
        if self.root_degree < 1:
            raise ConfigError(f"{where}.root_degree must be at least 1")
        if not 2 <= self.levels <= 16:
            raise ConfigError(f"{where}.levels must be in [2, 16]")
        if self.size_step < 0:
            raise ConfigError(f"{where}.size_step must be non-negative")
        if self.metric == "loss" and not self.reference:
            raise ConfigError(f"{where}.reference: metric 'loss' needs a reference model (a run dir or a model dir)")
        if self.metric == "resolution" and self.reference:
            raise ConfigError(f"{where}.reference is only used by metric 'loss'")


@dataclass
class BatchRampConfig:
    start: float = 0.25              # the first steps' batch: this fraction of data.batch_size
    steps: int = 0                   # steps to the full batch (0: the first half of the run, or of budget_s)
    buckets: int = 4                 # distinct batch sizes, start .. full (torch.compile: one graph each)

    def validate(self, where: str) -> None:
        if not 0 < self.start <= 1:
            raise ConfigError(f"{where}.start must be in (0, 1] (a fraction of data.batch_size)")
        if self.steps < 0:
            raise ConfigError(f"{where}.steps must be non-negative")
        if not 2 <= self.buckets <= 16:
            raise ConfigError(f"{where}.buckets must be in [2, 16]")


def ramp_batch(cfg: BatchRampConfig, position: float, total_steps: int, batch: int, world_size: int = 1) -> int:
    """The global batch at schedule ``position``: ``buckets`` sizes from start x batch to batch
    (MSLG-style steps, as random-LTD's token counts), multiples of 8 x ``world_size`` (even
    per-rank batches for timm's Mixup, tensor-core friendly) where the batch allows."""
    horizon = cfg.steps or max(total_steps // 2, 1)
    t = min(max(position / horizon, 0.0), 1.0)
    if t >= 1.0:
        return batch
    frac = cfg.start + math.floor(t * (cfg.buckets - 1)) / (cfg.buckets - 1) * (1 - cfg.start)
    unit = min(8 * world_size, batch)
    return max(unit, int(frac * batch) // unit * unit)


def pacing(cfg: CurriculumConfig, position: float, total_steps: int) -> float:
    """Difficulty at schedule ``position`` (steps): from ``start`` up to 1, monotonic."""
    horizon = cfg.steps or max(total_steps // 2, 1)
    t = min(max(position / horizon, 0.0), 1.0)
    if cfg.pacing == "root":
        t = t ** (1.0 / cfg.root_degree)
    elif cfg.pacing == "discrete":  # levels-1 equal phases before the horizon, then full
        t = 1.0 if t >= 1.0 else math.floor(t * (cfg.levels - 1)) / (cfg.levels - 1)
    return cfg.start + t * (1.0 - cfg.start)


def _size(difficulty: float, img_size: int, step: int) -> int:
    return img_size if difficulty >= 1.0 else max(step, int(difficulty * img_size) // step * step)


def resolutions(cfg: CurriculumConfig, img_size: int, step: int) -> list[int]:
    """Every size the pacing can ask for: torch.compile sees at most this many shapes."""
    if cfg.pacing == "discrete":
        return sorted({_size(cfg.start + k / (cfg.levels - 1) * (1 - cfg.start), img_size, step)
                       for k in range(cfg.levels)})
    # Continuous pacing passes every multiple of ``step`` between the first size and the full one.
    return sorted(set(range(_size(cfg.start, img_size, step), img_size, step)) | {img_size})


def _patch_size(model: nn.Module) -> int | None:
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        return None
    size = getattr(embed, "patch_size", 1)
    # HybridEmbed's patch size is on its stem's grid: in pixels it is times the stem's stride.
    ratio = embed.feat_ratio() if hasattr(embed, "feat_ratio") and hasattr(embed, "backbone") else 1
    return int(size[0] if isinstance(size, (tuple, list)) else size) * int(ratio)


def _size_step(cfg: CurriculumConfig, model: nn.Module) -> int:
    return cfg.size_step or _patch_size(model) or 8


def check_curriculum(model: nn.Module, cfg: CurriculumConfig, img_size: int, where: str = "curriculum") -> None:
    """Every model-dependent error, before any training (no reference lookup: see reference_model_dir)."""
    if cfg.metric != "resolution":
        return
    patch = _patch_size(model)
    if patch is not None and not hasattr(model, "dynamic_img_size"):
        raise ConfigError(f"{where}.metric resolution: {type(model).__name__} has a patch embedding but no "
                          f"timm dynamic_img_size; it cannot take other input sizes")
    step = _size_step(cfg, model)
    if patch is not None and step % patch:
        raise ConfigError(f"{where}.size_step {step} is not a multiple of the model's patch size {patch}")
    if step > img_size:
        raise ConfigError(f"{where}.size_step {step} is larger than data.img_size {img_size}")


_STAGE = re.compile(r"^\d\d-[a-z_]+$")  # "01-train": a stage of this run


def reference_model_dir(ref: str, where: str = "curriculum", run_dir: Path | None = None) -> Path:
    """The model directory a ``reference`` names: a stage of this run ("01-train"), a model dir,
    a stage dir, or a run dir (its newest model)."""
    from ..engine.stage import MODEL_DIR, stage_dirs
    from ..models.io import SPEC_FILE

    path = Path(run_dir) / ref if run_dir is not None and _STAGE.match(ref) else Path(ref)
    if (path / SPEC_FILE).is_file():
        return path
    if (path / MODEL_DIR / SPEC_FILE).is_file():
        return path / MODEL_DIR
    for d in stage_dirs(path):
        if (d / MODEL_DIR / SPEC_FILE).is_file():
            return d / MODEL_DIR
    raise ConfigError(f"{where}.reference '{ref}': no trained model there (expected an earlier stage of this "
                      f"run such as '01-train', a model dir with {SPEC_FILE}, a stage dir, or a run dir)")


def check_reference(ref: str, stage_types: list[str], index: int, where: str = "curriculum") -> None:
    """Before the run: a stage reference must name an earlier stage of the recipe; a path must hold a model."""
    if _STAGE.match(ref):
        pos, kind = int(ref[:2]), ref[3:]
        if not 1 <= pos < index or stage_types[pos - 1] != kind:
            raise ConfigError(f"{where}.reference '{ref}' is not an earlier stage of this recipe (stages: "
                              f"{', '.join(f'{i:02d}-{t}' for i, t in enumerate(stage_types, 1))})")
        return
    reference_model_dir(ref, where)


@torch.no_grad()
def loss_scores(reference: Path, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], student: "ModelSpec",
                device: torch.device, where: str = "curriculum") -> torch.Tensor:
    """(N,) per-sample cross-entropy of the reference model, in the training set's index order."""
    from ..compress.teacher import TeacherInput
    from ..models.io import load_model

    model, spec = load_model(reference)
    if spec.num_classes != student.num_classes:
        raise ConfigError(f"{where}.reference {reference} predicts {spec.num_classes} classes, the data has "
                          f"{student.num_classes}: it must be trained on the same classes")
    model = model.to(device).eval()
    adapt = TeacherInput(student, spec).to(device)  # the student's normalization and size -> the reference's
    out = [F.cross_entropy(model(adapt(x)).float(), y.to(device), reduction="none").cpu() for x, y in batches]
    return torch.cat(out)


def _cached_scores(cfg: CurriculumConfig, loader: Any, student: "ModelSpec", device: torch.device,
                   run_dir: Path, dist: "DistInfo | None", where: str) -> torch.Tensor:
    """Scores from ``run_dir/curriculum`` when the reference weights and the training set match, else
    computed (by rank 0) and cached there. The key hashes the reference's files and the training labels."""
    ref = reference_model_dir(cfg.reference or "", where, run_dir)
    h = hashlib.sha256()
    hash_files(h, ref)
    h.update(loader.labels_in_order().numpy().tobytes())
    path = Path(run_dir) / "curriculum" / f"loss-{h.hexdigest()[:16]}.safetensors"
    fresh = not path.is_file()
    is_main = dist is None or dist.is_main
    scores = cached_tensor(path, "loss", lambda: loss_scores(ref, loader.in_order(), student, device, where),
                           is_main=is_main, metadata={"reference": str(ref)})
    if fresh and is_main:
        print(f"curriculum: scored {len(scores)} training samples with {ref} -> {path}")
    return scores


class CurriculumLoader:
    """A training loader under a curriculum and/or a batch ramp: same interface (``len``,
    ``batch_size``, ``num_samples``, ``epoch``). ``order`` (loss metric): sample indices,
    easiest first; ``img_size`` (resolution metric): batches are resized to the paced size;
    ``ramp``: each step trains on the first ramp_batch(...) samples of the batch."""

    def __init__(self, inner: Any, cfg: CurriculumConfig | None, total_steps: int, seed: int,
                 position: Callable[[int], float], *, order: torch.Tensor | None = None,
                 img_size: int = 0, size_step: int = 0, ramp: BatchRampConfig | None = None,
                 world_size: int = 1) -> None:
        self.inner, self.cfg, self.total_steps, self.seed = inner, cfg, total_steps, seed
        self.position, self.order = position, order
        self.img_size, self.size_step = img_size, size_step
        self.ramp, self.world_size = ramp, world_size
        if order is not None:
            inner.batch_indices = self._batch_indices

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    @property
    def num_samples(self) -> int:
        return self.inner.num_samples

    def _position(self, epoch: int, step: int) -> float:
        return self.position(epoch * len(self.inner) + step)

    def difficulty(self, epoch: int, step: int) -> float:
        assert self.cfg is not None
        return pacing(self.cfg, self._position(epoch, step), self.total_steps)

    def _batch_indices(self, epoch: int, step: int) -> torch.Tensor:
        """(B,) the global batch: without replacement from the easiest ``pool`` samples."""
        assert self.order is not None
        n, b = len(self.order), self.inner.batch_size
        pool = min(n, max(b, math.ceil(self.difficulty(epoch, step) * n)))
        g = torch.Generator().manual_seed(step_seed(self.seed, epoch, step, 1))
        return self.order[torch.randperm(pool, generator=g)[:b]]

    def size(self, epoch: int, step: int) -> int:
        return _size(self.difficulty(epoch, step), self.img_size, self.size_step)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, (x, y) in enumerate(self.inner.epoch(epoch, start_step), start=start_step):
            if self.ramp is not None:  # this rank's share of the ramped global batch
                keep = ramp_batch(self.ramp, self._position(epoch, step), self.total_steps, self.batch_size,
                                  self.world_size) // self.world_size
                x, y = x[:keep], y[:keep]
            if self.cfg is not None and self.cfg.metric == "resolution":
                s = self.size(epoch, step)
                if s != x.shape[-1]:
                    # antialias: downsizing without aliasing, as a resized JPEG would look.
                    x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            yield x, y  # x: (b, C, s, s)


def _enable_dynamic_size(model: nn.Module) -> None:
    """What timm's VisionTransformer(dynamic_img_size=True) sets up, switched on in place: the patch
    embedding accepts any multiple of the patch size and keeps the grid (NHWC), so _pos_embed
    interpolates the position embeddings to it (unchanged at the trained size)."""
    from timm.layers import Format

    if getattr(model, "patch_embed", None) is None or model.dynamic_img_size:
        return
    embed = model.patch_embed
    embed.strict_img_size, embed.flatten, embed.output_fmt = False, False, Format.NHWC
    model.dynamic_img_size = True


def apply_curriculum(model: nn.Module, loaders: "Loaders", cfg: CurriculumConfig | None, hooks: "Hooks", *,
                     spec: "ModelSpec", epochs: int, seed: int, device: torch.device, run_dir: Path,
                     dist: "DistInfo | None" = None, batch_ramp: BatchRampConfig | None = None,
                     where: str = "curriculum") -> "Loaders":
    """``loaders`` with the training loader under the curriculum and the batch ramp (unchanged
    when both are None). Resolution: the model's dynamic input size is switched on in place.
    The pacing follows ``hooks.budget_position`` when the trainer sets one (budget_s), else the step."""
    if cfg is None and batch_ramp is None:
        return loaders
    from dataclasses import replace

    img_size, world = loaders.info.img_size, dist.world_size if dist is not None else 1
    total = epochs * len(loaders.train)

    def position(global_step: int) -> float:
        return hooks.budget_position(global_step) if hooks.budget_position is not None else global_step

    kw: dict[str, Any] = {"ramp": batch_ramp, "world_size": world}
    if cfg is not None and cfg.metric == "resolution":
        check_curriculum(model, cfg, img_size, where)
        kw.update(img_size=img_size, size_step=_size_step(cfg, model))
        _enable_dynamic_size(model)
        sizes = resolutions(cfg, img_size, kw["size_step"])
        print(f"curriculum: resolution {sizes[0]}..{img_size} ({cfg.pacing}); {len(sizes)} distinct sizes {sizes}")
    elif cfg is not None:
        scores = _cached_scores(cfg, loaders.train, spec, device, run_dir, dist, where)
        kw["order"] = torch.argsort(scores, stable=True)  # easiest first
        print(f"curriculum: loss under {cfg.reference} ({cfg.pacing}); pool {cfg.start:.0%}..100% of "
              f"{len(scores)} samples, easiest first")
    if batch_ramp is not None:
        b = loaders.train.batch_size
        sizes = sorted({ramp_batch(batch_ramp, p, total, b, world) for p in range(0, total + 1)})
        print(f"batch_ramp: global batch {sizes[0]}..{b}; {len(sizes)} distinct sizes {sizes}")
    return replace(loaders, train=CurriculumLoader(loaders.train, cfg, total, seed, position, **kw))


def setup_curriculum(blocks: dict[str, Any], ts: Any) -> None:
    """Trainer extension (``curriculum``, ``batch_ramp``): the training loader under both."""
    ts.loaders = apply_curriculum(ts.model, ts.loaders, blocks["curriculum"], ts.hooks, spec=ts.spec,
                                  epochs=ts.cfg.epochs, seed=ts.seed, device=ts.device, run_dir=ts.run_dir,
                                  dist=ts.dist, batch_ramp=blocks["batch_ramp"], where=f"{ts.where}.curriculum")


def preflight_curriculum(blocks: dict[str, Any], recipe: Any, index: int, where: str,
                         skeleton: Callable[[], nn.Module | None]) -> None:
    """Before the run: the loss curriculum's reference, and resolution support on the recipe's model."""
    cfg = blocks["curriculum"]
    if cfg is None:
        return
    if cfg.metric == "loss":
        check_reference(cfg.reference or "", [s.type for s in recipe.stages], index, f"{where}.curriculum")
    model = skeleton()
    if model is not None:
        check_curriculum(model, cfg, recipe.data.img_size, f"{where}.curriculum")
