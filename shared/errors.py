"""Typed errors for anything a user can cause. The CLIs turn them into one clean
message (no traceback); library code never uses ``assert`` for user input."""

from __future__ import annotations

import errno
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RECORD_FIX = ("Fix the record, map the column with --column, or pass --skip-invalid to count "
              "and skip such records.")
FILE_FIELD = "<file>"  # an error about a whole input file, not one record


class KtoError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is the whole message."""


class ConfigError(KtoError):
    """An option or combination of options is invalid."""


def check_seed(seed: int) -> None:
    """numpy and torch take seeds in [0, 2**32 - 1]; refuse others before any work."""
    if not 0 <= seed < 2**32:
        raise ConfigError(f"--seed {seed}: expected an integer in [0, {2**32 - 1}]")


def check_finite(config: object) -> None:
    """NaN passes every ``x <= 0`` check and fails late (after the cache copy and the model
    load), inf overflows: refuse any non-finite float option of a config dataclass."""
    import dataclasses
    import math

    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name.replace('_', '-')} {value}: expected a finite number")


class InputError(KtoError):
    """One input record (or, with field ``<file>``, a whole input file) is invalid; names
    the file, record index, field, expectation and the fix. Only record errors can be
    skipped with --skip-invalid, so only they suggest it."""

    def __init__(self, path: str, index: int, field: str, reason: str, expected: str, seen: str,
                 fix: str | None = None):
        self.path, self.index, self.field = path, index, field
        self.reason, self.expected, self.seen = reason, expected, seen
        if field == FILE_FIELD:
            where = f"{path}: {reason}: expected {expected}, got {seen}."
            fix = fix or "Fix the file or the --data path."
        else:
            where = (f"{path}: record {index}, field '{field}': {reason}: expected {expected}, "
                     f"got {seen}.")
            fix = fix or RECORD_FIX
        super().__init__(f"{where} {fix}")


class CacheError(KtoError):
    """A cache directory is incomplete, damaged or does not match what is asked of it."""


class ServerError(KtoError):
    """A reference-model server could not be reached, refused a request, or answered
    something that is not a valid answer; names the server and the last status."""


class RowScoreError(KtoError):
    """A scorer's answer for one sequence is unusable (wrong length, a missing position or
    token, a non-finite value). ``index`` is the sequence's place in the ``score`` call, so
    the caller, who knows the rows, can name the row."""

    def __init__(self, index: int, reason: str, where: str | None = None):
        self.index, self.reason = index, reason
        super().__init__(f"{where or f'sequence {index}'}: {reason}")


_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)
ENVIRONMENT_ERRNOS = _SPACE + _ACCESS + (errno.ENOTDIR, errno.EISDIR)


class StorageError(KtoError):
    """A file could not be written or read for a reason of the machine, not of the data
    (disk full, read-only, no permission): names the path and what to do."""

    def __init__(self, path: object, err: OSError, where: str = "--output"):
        self.errno = err.errno
        reason = os.strerror(err.errno) if err.errno else (err.strerror or str(err))
        if err.errno in _SPACE:
            text = (f"cannot write {path or 'a file'}: {reason}; free space on that disk (or "
                    f"raise the quota) or choose another {where}, then rerun the same command: "
                    "finished work is kept")
        elif err.errno in _ACCESS:
            text = (f"cannot access {path or 'a file'}: {reason}; check its permissions, or "
                    f"choose a folder you can write ({where})")
        else:
            text = f"{path or 'a file'}: {reason}; check the path given as {where}"
        super().__init__(text)


@contextmanager
def writing(path: object, where: str = "--output") -> Iterator[None]:
    """Report a write that failed for a reason of the machine as a StorageError naming
    ``path``: an OSError with such an errno, or a library's own error (torch.save says
    only "unexpected pos ...") when the disk is found full."""
    try:
        yield
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRNOS:
            raise
        raise StorageError(path, err, where) from None
    except KtoError:
        raise
    except Exception:  # torch.save's RuntimeError, safetensors' SafetensorError, ...
        if not disk_full(Path(str(path))):
            raise
        raise StorageError(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                           where) from None


def disk_full(path: Path, margin: int = 1 << 20) -> bool:
    """Less than ``margin`` bytes left on the disk holding ``path`` (or its nearest parent)."""
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free < margin
    return False


class Interrupted(KtoError):
    """Stopped by a signal (a scheduler's preemption, Ctrl-C). ``exit_code`` is the shell's
    convention for a signal, 128 + its number (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int, message: str | None = None):
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(message or f"stopped by {name}; temporary files were removed. Rerun "
                                    "the same command to continue: finished work is kept")
