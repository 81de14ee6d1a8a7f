"""Small file helpers: atomic writes, JSON lines, content hashes of a folder."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import hashlib

__all__ = ["atomic_write_text", "atomic_write_json", "append_jsonl", "hash_files"]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file and rename, so a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def hash_files(h: "hashlib._Hash", directory: str | Path) -> None:
    """Feed each file of ``directory`` (name and bytes, sorted) into hash ``h``."""
    for f in sorted(Path(directory).iterdir()):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
