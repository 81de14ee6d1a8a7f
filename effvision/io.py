"""Small file helpers: atomic writes, JSON lines, content hashes of a folder, and the one reader
of the JSON objects effvision keeps in its folders."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EffVisionError

if TYPE_CHECKING:
    import hashlib

__all__ = ["atomic_write_text", "atomic_write_json", "append_jsonl", "hash_files", "read_json_object"]

_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false",
               type(None): "null"}


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file and rename, so a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk: the old file stays, and no temporary one is left beside it
        tmp.unlink(missing_ok=True)
        raise
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


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """The JSON object in file ``path`` (``what`` it is: "model spec", ...). A file that cannot be
    read, is not UTF-8, is not JSON or holds something other than an object is an EffVisionError
    naming the file and the problem, chained to its cause."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise EffVisionError(f"cannot read {what} {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise EffVisionError(f"corrupt {what} {path}: not UTF-8 text (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise EffVisionError(f"corrupt {what} {path}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    except RecursionError as e:  # nested deeper than the decoder follows
        raise EffVisionError(f"corrupt {what} {path}: JSON nested too deeply") from e
    if not isinstance(data, dict):
        raise EffVisionError(f"corrupt {what} {path}: a JSON object is expected, the file holds "
                             f"{_JSON_TYPES.get(type(data), type(data).__name__)}")
    return data
