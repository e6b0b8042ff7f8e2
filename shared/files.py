"""Creating the files this project owns without following links. An output folder may
be shared with other users (a team's scratch space, /tmp): a symbolic link planted where
one of our files belongs (a lock file, a shard, the final model's config.json) must never
make us write through it into its target. Every file we create is opened with
O_NOFOLLOW (and O_EXCL for the hidden temporary names), and a link found where one of
our files belongs is an error naming it, never silently replaced or followed."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from shared.errors import ConfigError, StorageError

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class LinkError(ConfigError):
    """A symbolic link where a file or folder of ours belongs."""

    def __init__(self, path: Path, what: str):
        target = os.readlink(path) if path.is_symlink() else "?"
        super().__init__(f"{path} is a symbolic link (to {target}) where {what} belongs; "
                         "kto-cache never writes through a link: remove the link (or choose "
                         "another folder) and rerun")


def refuse_link(path: Path, what: str = "a file of this run") -> None:
    if path.is_symlink():
        raise LinkError(path, what)


def refuse_links(folder: Path, names: Iterable[str], what: str) -> None:
    for name in names:
        refuse_link(folder / name, what)


def refuse_links_in(folder: Path, what: str) -> None:
    """An output folder is ours alone: a link directly in it (where a lock, a shard, a
    manifest, a checkpoint or a file of the final save would go) is refused before any
    work, not found when the file is written hours later."""
    if folder.is_dir():
        links = sorted(p.name for p in folder.iterdir() if p.is_symlink())
        if links:
            raise LinkError(folder / links[0], f"a file of {what}")


def open_new(path: Path) -> BinaryIO:
    """A new file at ``path`` for writing; a stale one (or a link) there is removed first
    (unlinking a link removes the link, not its target)."""
    path.unlink(missing_ok=True)
    return open(path, "wb", opener=lambda name, _flags: os.open(name, _NEW, 0o644))


def open_no_follow(path: Path, flags: int) -> int:
    """os.open for a file of ours that may already exist (a lock file): a link is an error."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if path.is_symlink():
            raise LinkError(path, "a file of this run") from None
        raise StorageError(path, err) from None
    if os.fstat(fd).st_nlink > 1:  # a hard link: writing would change the other name too
        os.close(fd)
        raise ConfigError(f"{path} has other hard links: another file shares its contents, "
                          "and kto-cache would write into it; remove it and rerun")
    return fd


def atomic_write(final: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a hidden new file beside ``final``, fsync, rename over ``final``:
    readers see the old file or the new one, never a part. A link at ``final`` is an
    error; a disk error is a StorageError naming ``final``; the hidden file never stays."""
    refuse_link(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        with open_new(tmp) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as err:
        raise StorageError(final, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(final: Path, text: str) -> None:
    atomic_write(final, lambda f: f.write(text.encode("utf-8")))
