"""Read input records from JSON, JSONL, Parquet or a ``datasets.save_to_disk``
directory, one dict at a time, keeping each record's index for error messages."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.errors import InputError
from shared.fingerprint import sha256_file

SUPPORTED = ".json, .jsonl, .parquet or a directory written by datasets.save_to_disk"
_BATCH_ROWS = 1000


def iter_records(path: str) -> Iterator[tuple[int, Any]]:
    """Yield ``(index_in_file, record)`` for every record of one input file. A JSON
    line that does not parse is yielded as an ``InputError`` in place of the record,
    so the caller decides whether it stops the run or is counted and skipped."""
    p = Path(path)
    if p.is_dir():
        yield from _iter_saved_dataset(p)
    elif not p.exists():
        raise InputError(path, 0, "<file>", "file not found", SUPPORTED, "a missing path")
    elif p.suffix == ".jsonl":
        yield from _iter_jsonl(p)
    elif p.suffix == ".json":
        yield from _iter_json(p)
    elif p.suffix == ".parquet":
        yield from _iter_parquet(p)
    else:
        raise InputError(path, 0, "<file>", "unsupported file type", SUPPORTED, repr(p.suffix))


def _iter_jsonl(p: Path) -> Iterator[tuple[int, Any]]:
    index = 0
    with p.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record: Any = json.loads(line)
            except json.JSONDecodeError as err:
                record = InputError(str(p), index, "<line>", "invalid JSON",
                                    "one JSON object per line",
                                    f"line {line_no} ({err.msg}): {line.strip()[:60]!r}")
            yield index, record
            index += 1


def _iter_json(p: Path) -> Iterator[tuple[int, Any]]:
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON lines under a .json name
            yield from _iter_jsonl(p)
            return
        raise InputError(str(p), 0, "<file>", "invalid JSON", "a JSON array of objects",
                         f"a parse error at line {err.lineno} column {err.colno} ({err.msg})",
                         ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise InputError(str(p), 0, "<file>", "wrong top-level value", "a JSON array of objects",
                         type(data).__name__)
    yield from enumerate(data)


def _iter_parquet(p: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(p).iter_batches(batch_size=_BATCH_ROWS):
        for record in batch.to_pylist():
            yield index, record
            index += 1


def _iter_saved_dataset(p: Path) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:
        raise InputError(str(p), 0, "<file>", "not a saved dataset", SUPPORTED,
                         "a directory without dataset_info.json / state.json") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise InputError(str(p), 0, "<file>", "a DatasetDict without a 'train' split",
                             "a Dataset, or a DatasetDict with 'train'", str(list(ds)))
        ds = ds["train"]
    index = 0
    for batch in ds.iter(batch_size=_BATCH_ROWS):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            yield index, dict(zip(columns, values, strict=True))
            index += 1


def fingerprint_inputs(paths: tuple[str, ...]) -> str:
    """SHA-256 over every input file's name and SHA-256 (a directory: its files, sorted)."""
    h = hashlib.sha256()
    for path in paths:
        files = sorted(Path(path).rglob("*")) if os.path.isdir(path) else [Path(path)]
        for f in files:
            if f.is_file():
                h.update(str(f.relative_to(path) if os.path.isdir(path) else f.name).encode())
                h.update(sha256_file(f).encode())
    return h.hexdigest()
