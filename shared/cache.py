"""The cache on disk (spec section 4): Parquet shards with a fixed schema, written
atomically, and a manifest that lists each shard with its rows, tokens and SHA-256.
``verify_cache`` is what both `kto-precompute verify` and kto-train call."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shared import CACHE_FORMAT_VERSION
from shared.errors import CacheError
from shared.fingerprint import sha256_file

MANIFEST = "manifest.json"
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source_index", pa.int64()),
    ("label", pa.bool_()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("completion_ids", pa.list_(pa.int32())),
    ("kl_completion_ids", pa.list_(pa.int32())),
    ("kl_partner", pa.string()),
    ("ref_logps", pa.float64()),
    ("ref_kl_logps", pa.float64()),
])
_META_KEY = b"kto_cache"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    rows: int
    tokens: int
    sha256: str


def shard_name(index: int, total: int) -> str:
    return f"shard-{index:05d}-of-{total:05d}.parquet"


def table_tokens(table: pa.Table) -> int:
    """Tokens scored for a shard: prompt + completion and prompt + KL completion per row."""
    lengths = {c: pc.list_value_length(table[c]) for c in
               ("prompt_ids", "completion_ids", "kl_completion_ids")}
    total = pc.sum(lengths["prompt_ids"]).as_py() or 0
    return 2 * total + sum(pc.sum(lengths[c]).as_py() or 0
                           for c in ("completion_ids", "kl_completion_ids"))


def write_shard(directory: Path, name: str, table: pa.Table, cache_key: str) -> ShardInfo:
    """Write to a temporary name, fsync, then rename: a reader never sees half a shard."""
    table = table.cast(SCHEMA).replace_schema_metadata({_META_KEY: cache_key.encode()})
    final = directory / name
    tmp = directory / f".{name}.tmp-{os.getpid()}"
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return ShardInfo(name, table.num_rows, table_tokens(table), sha256_file(final))


def existing_shard(directory: Path, name: str, cache_key: str) -> ShardInfo | None:
    """A complete shard left by an earlier run with the same settings, or None."""
    path = directory / name
    if not path.is_file():
        return None
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError):
        return None
    if meta.get(_META_KEY) != cache_key.encode():
        raise CacheError(f"{path} was written with other settings (cache key differs); "
                         "use a new --output directory or pass --overwrite")
    table = pq.read_table(path, columns=["prompt_ids", "completion_ids", "kl_completion_ids"])
    return ShardInfo(name, table.num_rows, table_tokens(table), sha256_file(path))


def write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_manifest(directory: str | Path, name: str = MANIFEST) -> dict[str, Any]:
    path = Path(directory) / name
    if not path.is_file():
        raise CacheError(f"{path} not found: not a finished cache (a worker part has "
                         "manifest.worker-*.json; combine parts with `kto-precompute combine`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CacheError(f"{path} is not valid JSON ({err.msg})") from None
    if manifest.get("format_version") != CACHE_FORMAT_VERSION:
        raise CacheError(f"{path}: format_version {manifest.get('format_version')!r}, this "
                         f"version reads {CACHE_FORMAT_VERSION}")
    return manifest


def verify_cache(directory: str | Path, checksums: bool = True) -> dict[str, Any]:
    """Check the manifest, every shard's presence, schema, row count and SHA-256."""
    root = Path(directory)
    manifest = read_manifest(root)
    shards = manifest["shards"]
    if len(shards) != manifest["num_shards"]:
        raise CacheError(f"{root}: manifest lists {len(shards)} shards of "
                         f"{manifest['num_shards']}")
    for entry in shards:
        _verify_shard(root, entry, checksums)
    rows = sum(s["rows"] for s in shards)
    if rows != manifest["counts"]["rows"]:
        raise CacheError(f"{root}: shards hold {rows} rows, manifest counts "
                         f"{manifest['counts']['rows']}")
    return manifest


def _verify_shard(root: Path, entry: dict[str, Any], checksums: bool) -> None:
    path = root / entry["name"]
    if not path.is_file():
        raise CacheError(f"shard {entry['name']} is missing from {root}")
    if checksums and sha256_file(path) != entry["sha256"]:
        raise CacheError(f"shard {entry['name']} is damaged: its SHA-256 does not match the "
                         "manifest; re-run kto-precompute on the same --output to rebuild it")
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowInvalid, OSError) as err:
        raise CacheError(f"shard {entry['name']} cannot be read as Parquet ({err})") from None
    missing = [f.name for f in SCHEMA if schema.get_field_index(f.name) < 0
               or schema.field(f.name).type != f.type]
    if missing:
        raise CacheError(f"shard {entry['name']}: columns missing or of the wrong type: {missing}")
    if meta.num_rows != entry["rows"]:
        raise CacheError(f"shard {entry['name']} holds {meta.num_rows} rows, manifest says "
                         f"{entry['rows']}")


def shard_infos(entries: list[ShardInfo]) -> list[dict[str, Any]]:
    return [asdict(e) for e in sorted(entries, key=lambda e: e.name)]
