"""Experiment logging beside metrics.jsonl: TensorBoard event files, a CSV summary (one row per
evaluation, like timm's summary.csv) and, when installed, Weights & Biases.

metrics.jsonl stays the record effvision itself reads (resume truncates it); these are views
of the same records for the tools people already use. Only rank 0 logs.
"""
from __future__ import annotations

import csv
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import atomic_write_text

__all__ = ["LogConfig", "RunLogger"]


@dataclass
class LogConfig:
    """Experiment logging beside metrics.jsonl: TensorBoard, a CSV summary, and Weights & Biases."""

    tensorboard: bool = True        # <stage dir>/tensorboard/ event files (`tensorboard --logdir runs/`)
    csv: bool = True                # <stage dir>/summary.csv, one row per evaluation
    wandb: bool = False             # Weights & Biases (needs `pip install wandb` and a login or WANDB_MODE=offline)
    wandb_project: str = "effvision"

    def validate(self, where: str) -> None:
        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"{where}.wandb: the wandb package is not installed (pip install wandb), "
                              f"or set {where}.wandb: false")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(f"{where}.tensorboard: the tensorboard package is not installed "
                              f"(pip install tensorboard), or set {where}.tensorboard: false")


class RunLogger:
    """Writes the trainer's step and evaluation records to the configured tools."""

    def __init__(self, cfg: LogConfig, out_dir: Path, run_name: str, config: dict[str, Any] | None = None) -> None:
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.csv_path = self.out_dir / "summary.csv"
        self._tb = self._wandb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        if cfg.wandb:
            import wandb

            self._wandb = wandb.init(project=cfg.wandb_project, name=run_name, dir=str(self.out_dir),
                                     config=config or {}, resume="allow")

    def step(self, record: dict[str, Any]) -> None:
        """A training window: loss, lr, img/s at ``global_step``."""
        step = int(record["global_step"])
        scalars = {f"train/{k}": float(record[k]) for k in ("loss", "lr", "img_per_s") if k in record}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def evaluation(self, metrics: dict[str, Any], global_step: int, train_loss: float | None, lr: float) -> None:
        """An evaluation at the end of an epoch."""
        scalars = {f"eval/{k}": float(v) for k, v in metrics.items()
                   if k in ("top1", "top5", "loss") and v is not None}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, global_step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=global_step)
        if self.cfg.csv:
            row = {"epoch": metrics.get("epoch"), "global_step": global_step,
                   "train_loss": train_loss, "eval_loss": metrics.get("loss"), "eval_top1": metrics.get("top1"),
                   "eval_top5": metrics.get("top5"), "lr": lr}
            self._append_csv(row)

    def truncate(self, global_step: int) -> None:
        """Drop CSV rows after a checkpoint being resumed from (they are about to be redone).
        TensorBoard handles the repeat itself: it keeps the newest value of a step."""
        if not self.csv_path.is_file():
            return
        text = self.csv_path.read_bytes().decode("utf-8", errors="replace")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = [r for r in reader if str(r.get("global_step")).isdigit() and int(r["global_step"]) <= global_step]
        fields = reader.fieldnames or []
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.csv_path, out.getvalue())

    def _append_csv(self, row: dict[str, Any]) -> None:
        new = not self.csv_path.is_file()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.csv_path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row), lineterminator="\n")
            if new:
                w.writeheader()
            w.writerow(row)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
