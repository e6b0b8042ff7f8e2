"""Which shards of an earlier run may be reused. A shard is reused only when it is
exactly what this run would write: the same cache key in its footer, the SHA-256 the
folder's manifest recorded (when there is one), every page's CRC intact, the rows, KL
partners and KL completions this run derives, and finite reference values. Anything
else is damage (bit rot, a half-copied file, an edit): the shard is removed and
scored again, never blessed into a new manifest."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa

from shared.cache import (
    REFERENCE_COLUMNS,
    ShardInfo,
    non_finite_rows,
    read_shard,
    shard_cache_key,
    table_tokens,
)
from shared.errors import CacheError, KtoError
from shared.fingerprint import sha256_file
from shared.manifest import load_json_object

log = logging.getLogger(__name__)


def recorded_shards(out: Path, manifest_names: tuple[str, ...], cache_key: str) -> dict[str, str]:
    """Shard name -> SHA-256 from the folder's manifests written for this cache key (an
    unreadable manifest or one of another cache records nothing)."""
    found: dict[str, str] = {}
    for name in manifest_names:
        path = out / name
        if not path.is_file():
            continue
        try:
            manifest = load_json_object(path)
        except KtoError:
            continue
        if manifest.get("cache_key") != cache_key or not isinstance(manifest.get("shards"), list):
            continue
        for entry in manifest["shards"]:
            if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
                found.setdefault(str(entry.get("name")), entry["sha256"])
    return found


def reusable_shard(path: Path, cache_key: str, expected: pa.Table, sha256: str | None,
                   folder_is_ours: bool) -> ShardInfo | None:
    """The ShardInfo of a complete, intact shard at ``path``; None when there is none
    (a damaged one is removed, with a warning naming it and why)."""
    if not path.is_file():
        return None
    key = shard_cache_key(path)
    if key is not None and key != cache_key and not folder_is_ours:
        raise CacheError(f"{path} was written with other settings (cache key differs); "
                         "use a new --output directory or pass --overwrite")
    table, problem = _inspect(path, key, cache_key, expected, sha256)
    if table is not None and problem is None:
        return ShardInfo(path.name, table.num_rows, table_tokens(table), sha256_file(path))
    log.warning("shard %s is damaged (%s): removing it and scoring it again", path.name, problem)
    path.unlink()
    return None


def _inspect(path: Path, key: str | None, cache_key: str, expected: pa.Table,
             sha256: str | None) -> tuple[pa.Table | None, str | None]:
    """(the shard's table, None) when it is intact, else (None or the table, the problem)."""
    if key is None:
        return None, "not readable as Parquet"
    if key != cache_key:
        return None, "written for another cache"
    if sha256 is not None and sha256_file(path) != sha256:
        return None, "its SHA-256 differs from the manifest's"
    try:
        table = read_shard(path)
    except (pa.ArrowInvalid, OSError) as err:
        return None, f"unreadable: {err}"
    return table, _content_problem(table, expected)


def _content_problem(table: pa.Table, expected: pa.Table) -> str | None:
    if table.num_rows != expected.num_rows:
        return f"{table.num_rows} rows, this run's shard has {expected.num_rows}"
    for column in expected.column_names:
        if not table[column].equals(expected[column].cast(table.schema.field(column).type)):
            return f"column {column} differs from this run's rows"
    bad: dict[str, Any] = non_finite_rows(table.select(list(REFERENCE_COLUMNS)))
    return f"non-finite reference values {bad}" if bad else None
