"""What a run directory records about where it ran: versions, git SHA, hardware."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_environment", "git_sha", "cpu_name"]


def git_sha(cwd: Path | None = None) -> str | None:
    root = cwd or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def run_environment() -> dict[str, Any]:
    from effvision.export.manifest import package_versions

    hw: dict[str, Any] = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        hw["gpu"] = {"name": props.name, "count": torch.cuda.device_count(),
                     "memory_gb": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}"}
    return {"versions": package_versions(), "git_sha": git_sha(), "hardware": hw}
