"""A cheap look at a model folder's safetensors files before anything loads them: a file
whose size does not match its own header (a truncated download or copy) is named with the
fix, instead of failing deep inside a library after minutes of other work."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from shared.errors import ConfigError


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                return f"header of {length} bytes in a file of {size}"
            header = json.loads(f.read(length))
    except (struct.error, ValueError) as err:
        return f"unreadable header ({err})"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = 8 + length + max(ends, default=0)
    return None if expected == size else f"{size} bytes, its header describes {expected}"


def check_weight_files(model: str, option: str = "--model") -> None:
    """Raise ConfigError naming the first damaged safetensors file of a local model folder."""
    root = Path(model)
    if not root.is_dir():
        return  # a hub name: the hub client checks its downloads
    for path in sorted(root.rglob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise ConfigError(f"{option} {model}: {path} is damaged ({problem}): a truncated "
                              "copy or download; copy or download it again")
