"""One writer per directory: an exclusive OS lock held while a run, stage or export writes there.

``flock`` on a file inside the directory: the kernel drops it when its process dies, however
it dies, so a lock left by a killed run never blocks the next one. The file also names its
holder (pid, host, start time) for the error a second writer gets. It is removed on release
(with the directory, if the lock made it and nothing was written); a writer that locked a file
someone removed meanwhile tries again on the new one.

Covered: processes on one machine, and on NFS where Linux emulates flock with POSIX locks
(NFSv4, or v3 with a lock manager). Not covered: filesystems without lock support (flock fails
there, and the run says so and stops), and two machines on a filesystem that accepts flock
locally only (some FUSE and Lustre mounts without ``-o flock``): each machine sees only its own.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from .errors import EffVisionError

__all__ = ["DirLock", "LOCK_FILE", "DirectoryBusy"]

LOCK_FILE = ".effvision.lock"


class DirectoryBusy(EffVisionError):
    """Another live process writes into this directory."""


class DirLock:
    """``with DirLock(path):`` holds ``path`` (made if missing) for one writer, or raises
    ``DirectoryBusy`` naming the holder at once (it never waits)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.path = self.dir / LOCK_FILE
        self._fd: int | None = None
        self._made_dir = False

    def acquire(self) -> DirLock:
        self._made_dir = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                self._made_dir = False  # not ours to tidy
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise DirectoryBusy(f"{self.dir} is in use by another effvision process ({holder}); wait for it "
                                        f"to end or choose another --out (nothing was changed)") from e
                raise EffVisionError(f"cannot lock {self.dir} ({e.strerror}): this filesystem has no file locks, "
                                     f"so two runs could write here at once; use a local folder") from e
            try:  # the file we locked is still the one at the path (a releasing holder may have removed it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # Removed while still locked, so no other process can lock it between the two steps.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._made_dir and not any(self.dir.iterdir()):
            self.dir.rmdir()  # a writer that failed before writing leaves no empty folder behind

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        h = json.loads(os.pread(fd, 4096, 0))
        return f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (OSError, ValueError, TypeError, KeyError):  # the holder is still writing it
        return "holder not yet recorded"
