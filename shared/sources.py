"""Where a model, tokenizer or output folder named on the command line is, checked before
any work: a local path that does not exist is said at once (not after the hub client's
retries, which took a minute with no network), and a refused run removes the folder it
created."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from shared.errors import ConfigError

log = logging.getLogger(__name__)


def looks_like_path(value: str) -> bool:
    """A name the Hub cannot hold (absolute, ./, ../, ~, more than one slash) or whose
    first component is a local folder: meant as a path, so it must exist."""
    if value.startswith(("/", "./", "../", "~", ".\\")) or value.count("/") > 1 or "\\" in value:
        return True
    head = value.split("/", 1)[0]
    return "/" in value and os.path.isdir(head)


def check_model_source(value: str, option: str = "--model") -> None:
    """A local folder must exist; a Hub id must be in the hub cache or on the Hub (one
    request, no retries; offline, the cache only)."""
    if Path(value).expanduser().exists():
        return
    if looks_like_path(value):
        raise ConfigError(f"{option} {value}: no such folder; check the path (a Hub model id "
                          "is org/name)")
    problem = _hub_problem(value)
    if problem:
        raise ConfigError(f"{option} {value}: no such local folder, and {problem}; check the "
                          "path or the model id")


def _hub_problem(name: str) -> str | None:
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        snapshot_download(name, local_files_only=True)
        return None  # in the hub cache
    except Exception:  # noqa: S110 (not cached: ask the Hub below)
        pass
    if constants.HF_HUB_OFFLINE:
        return "not in the hub cache (HF_HUB_OFFLINE is set)"
    try:
        HfApi().model_info(name, timeout=10)
    except Exception as err:  # the hub client raises many kinds; the message is what matters
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        return f"the Hub has no such model or could not be reached ({first})"
    return None


@contextlib.contextmanager
def removed_if_refused(folder: Path) -> Iterator[None]:
    """Create ``folder`` for a run; when the run fails and the folder it created is still
    empty, remove it, so a refused run leaves nothing behind."""
    created = not folder.exists()
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # not empty (or gone): keep what is there
                folder.rmdir()
        raise
