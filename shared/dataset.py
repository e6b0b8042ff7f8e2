"""The public way to read a cache: every shard, checksums verified, as a memory-mapped
``pyarrow`` table (``open_cache``) or as a ``datasets.Dataset`` (``load_cache_dataset``).

What "memory-mapped" means here. Parquet pages are compressed, so a Parquet shard cannot be
mapped as columns. ``open_cache`` decompresses the shards once, batch by batch, into one
uncompressed Arrow IPC file and maps that file: the table's buffers are pages of the file,
read from disk when touched and dropped by the kernel under memory pressure, not heap
memory. The file goes to ``spill`` if given (the caller deletes it) or else to the temp
folder, where it is unlinked as soon as it is mapped: the mapping keeps it readable, and
the disk space comes back when the table is released. ``load_cache_dataset`` uses the
ecosystem's own version of the same idea: ``datasets`` converts the verified shards into
Arrow files in its cache folder (``HF_DATASETS_CACHE``), kept and reused across calls, and
memory-maps them.

    from shared.dataset import load_cache_dataset, open_cache
    cache = open_cache("CACHE")              # cache.table: pa.Table, cache.manifest: dict
    ds = load_cache_dataset("CACHE")         # datasets.Dataset, split "train"
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shared.cache import SCHEMA, VISION_SCHEMA, verify_cache, vision_features
from shared.errors import CacheError

log = logging.getLogger(__name__)
_BATCH_ROWS = 1024  # rows decoded from Parquet at a time while spilling


@dataclass(frozen=True)
class CacheTable:
    """A verified cache: its manifest and all its rows, memory-mapped, in shard order."""

    directory: Path
    manifest: dict[str, Any]
    table: pa.Table

    def __len__(self) -> int:
        return self.table.num_rows


def open_cache(directory: str | Path, *, verify: bool = True,
               columns: Sequence[str] | None = None,
               spill: str | Path | None = None) -> CacheTable:
    """Check the cache (manifest, every shard's presence, schema and row count; with
    ``verify`` also every shard's SHA-256) and map its rows. ``columns``: a subset of the
    cache's columns (default all, in the cache's order)."""
    manifest = verify_cache(directory, checksums=verify)
    return CacheTable(Path(directory), manifest, map_shards(directory, manifest, columns, spill))


def map_shards(directory: str | Path, manifest: dict[str, Any],
               columns: Sequence[str] | None = None,
               spill: str | Path | None = None) -> pa.Table:
    """The rows of the manifest's shards (already verified by the caller), copied into one
    Arrow IPC file and memory-mapped. Memory while copying: one batch of rows."""
    schema = _schema(columns, "processor" in manifest)
    if spill is None:
        fd, name = tempfile.mkstemp(prefix="kto-cache-", suffix=".arrow")
        os.close(fd)
        try:
            table = _spill_and_map(Path(directory), manifest, schema, Path(name))
        finally:
            _unlink_mapped(Path(name))
        return table
    return _spill_and_map(Path(directory), manifest, schema, Path(spill))


def _schema(columns: Sequence[str] | None, vision: bool = False) -> pa.Schema:
    full = VISION_SCHEMA if vision else SCHEMA
    if columns is None:
        return full
    unknown = [c for c in columns if full.get_field_index(c) < 0]
    if unknown:
        raise CacheError(f"no column(s) {unknown} in a cache; the columns are {full.names}")
    return pa.schema([full.field(c) for c in columns])


def _spill_and_map(root: Path, manifest: dict[str, Any], schema: pa.Schema,
                   path: Path) -> pa.Table:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for shard in manifest["shards"]:
            reader = pq.ParquetFile(root / shard["name"])
            for batch in reader.iter_batches(batch_size=_BATCH_ROWS, columns=schema.names):
                writer.write_batch(pa.RecordBatch.from_arrays(
                    [batch.column(name) for name in schema.names], schema=schema))
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def _unlink_mapped(path: Path) -> None:
    """POSIX keeps an unlinked file's pages while a mapping holds them; elsewhere the
    file stays in the temp folder."""
    try:
        path.unlink()
    except OSError as err:
        log.debug("could not remove the spill file %s (%s); it stays in the temp folder",
                  path, err)


def cache_features():
    """The cache schema as ``datasets`` features (what the dataset card declares)."""
    import datasets

    return datasets.Features.from_arrow_schema(SCHEMA)


def load_cache_dataset(directory: str | Path, *, verify: bool = True,
                       cache_dir: str | None = None, keep_in_memory: bool | None = None):
    """The cache as a ``datasets.Dataset`` (all columns, shard order), after the same checks
    as ``open_cache``. Unlike a bare ``datasets.load_dataset(CACHE)``, it reads exactly the
    shards the manifest lists and only after their checksums matched."""
    import datasets

    root = Path(directory)
    manifest = verify_cache(root, checksums=verify)
    files = [str(root / s["name"]) for s in manifest["shards"]]
    features = vision_features() if "processor" in manifest else cache_features()
    return datasets.load_dataset("parquet", data_files={"train": files}, split="train",
                                 features=features, cache_dir=cache_dir,
                                 keep_in_memory=keep_in_memory)
