"""Typed errors for anything a user can cause. The CLIs turn them into one clean
message (no traceback); library code never uses ``assert`` for user input."""

from __future__ import annotations


class KtoError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is the whole message."""


class ConfigError(KtoError):
    """An option or combination of options is invalid."""


class InputError(KtoError):
    """One input record is invalid; names the file, record index, field and expectation."""

    def __init__(self, path: str, index: int, field: str, reason: str, expected: str, seen: str):
        self.path, self.index, self.field = path, index, field
        self.reason, self.expected, self.seen = reason, expected, seen
        super().__init__(
            f"{path}: record {index}, field '{field}': {reason}: expected {expected}, got {seen}. "
            "Fix the record, map the column with --column, or pass --skip-invalid to count "
            "and skip such records."
        )


class CacheError(KtoError):
    """A cache directory is incomplete, damaged or does not match what is asked of it."""
