"""Compare the reference values of two caches of the same rows (e.g. bf16 vs fp32, or
vLLM vs transformers): how far apart are the sums, row by row, matched by id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from shared.dataset import open_cache
from shared.errors import CacheError

COLUMNS = ("ref_logps", "ref_kl_logps")


def _values(directory: Path) -> pa.Table:
    return open_cache(directory, verify=False, columns=["id", *COLUMNS]).table


def compare_caches(a: Path, b: Path) -> dict[str, Any]:
    ta, tb = _values(a), _values(b)
    index = {row_id: i for i, row_id in enumerate(tb["id"].to_pylist())}
    ids = ta["id"].to_pylist()
    if len(ids) != len(index) or any(i not in index for i in ids):
        raise CacheError(f"{a} and {b} do not hold the same rows (ids differ); compare caches "
                         "built from the same data and preprocessing options")
    order = np.array([index[i] for i in ids])
    out: dict[str, Any] = {"rows": len(ids)}
    for col in COLUMNS:
        diff = np.abs(ta[col].to_numpy() - tb[col].to_numpy()[order])
        out[col] = {"max": float(diff.max()), "mean": float(diff.mean()),
                    "median": float(np.median(diff))}
    return out
