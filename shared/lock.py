"""One writer per folder (or per worker part of a shared cache folder): an advisory
``flock`` on a hidden lock file, taken without waiting. A second job started on the same
output (a double submission, a scheduler's requeue while the first still runs) is refused
instead of interleaving its files with the first's. The kernel releases the lock when the
process dies, even by SIGKILL, so a rerun after a crash is never blocked by a stale lock."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path

from shared.errors import ConfigError
from shared.files import open_no_follow

log = logging.getLogger(__name__)


class FolderLock:
    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        while True:  # the holder unlinks the file before releasing: lock the file in place
            fd = self._open_and_lock()
            if fd is None:
                return self
            try:
                same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def _open_and_lock(self) -> int | None:
        """A descriptor holding the lock; None where the filesystem has no locks."""
        fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT)  # a planted link: an error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"{self.what} is in use by {holder} (lock {self.path}); wait for "
                              "that run to end, or choose another folder") from None
        except OSError as err:  # a filesystem without locks (Lustre without -o flock, ...)
            os.close(fd)
            log.warning("cannot lock %s (%s): a second job on the same folder would not be "
                        "refused", self.path, err.strerror)
            return None
        return fd

    def release(self) -> None:
        """Remove the file, then unlock: no lock file is left in the folder (one stays only
        after a kill, and the next job takes it over)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
