"""Read input records from JSON, JSONL (either gzipped: .json.gz, .jsonl.gz), Parquet, a
``datasets.save_to_disk`` directory, a dataset repository folder or a Hub dataset id (both
streamed through ``datasets``, with a config and split), one dict at a time, keeping each
record's index for error messages. JSON lines are read one line at a time, gzipped or not."""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from shared.errors import FILE_FIELD, InputError
from shared.fingerprint import sha256_file

SUPPORTED = (".json, .jsonl (or either gzipped: .json.gz, .jsonl.gz), .parquet, a directory "
             "written by datasets.save_to_disk, a dataset repository folder or a Hub dataset "
             "id (org/name)")
_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_SAVED = ("state.json", "dataset_dict.json")  # what datasets.save_to_disk writes
REENCODE = "Re-encode the file as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8 IN > OUT) and rerun."
_BATCH_ROWS = 1000


@dataclass(frozen=True)
class Subset:
    """Which part of a dataset repository (a Hub id or a local folder) to read."""

    config: str | None = None
    split: str = "train"


DEFAULT_SUBSET = Subset()


def is_hub_id(path: str) -> bool:
    """``org/name`` (or ``name``) that is no local path and no file name: a Hub dataset."""
    return (not os.path.exists(path) and bool(_HUB_ID.match(path))
            and not path.endswith(_SUFFIXES))


def iter_records(path: str, subset: Subset = DEFAULT_SUBSET) -> Iterator[tuple[int, Any]]:
    """Yield ``(index_in_file, record)`` for every record of one input file. A JSON
    line that does not parse is yielded as an ``InputError`` in place of the record,
    so the caller decides whether it stops the run or is counted and skipped."""
    p = Path(path)
    try:
        if is_hub_id(path):
            yield from _iter_repository(hub_snapshot(path)[0] or path, subset, path)
        elif p.is_dir() and not any((p / name).is_file() for name in _SAVED):
            yield from _iter_repository(str(p), subset, path)
        elif p.is_dir():
            yield from _iter_saved_dataset(p, subset.split)
        elif not p.exists():
            raise InputError(path, 0, FILE_FIELD, "file not found", SUPPORTED, "a missing path",
                             fix="Check the --data path.")
        elif p.name.endswith((".jsonl", ".jsonl.gz")):
            yield from _iter_jsonl(p)
        elif p.name.endswith((".json", ".json.gz")):
            yield from _iter_json(p)
        elif p.suffix == ".parquet":
            yield from _iter_parquet(p)
        else:
            raise InputError(path, 0, FILE_FIELD, "unsupported file type", SUPPORTED,
                             repr("".join(p.suffixes[-2:])),
                             fix="Convert it to one of these, or rename a JSON "
                             "lines file to .jsonl.")
    except OSError as err:  # no permission, a directory where a file should be, I/O error
        raise InputError(path, 0, FILE_FIELD, "cannot read the file", "a readable file",
                         err.strerror or str(err),
                         fix="Check the file's permissions and the --data path.") from None


# what a damaged file raises while it is read (gzip: bad header, truncated stream, bad CRC)
_READ_ERRORS = (OSError, EOFError, zlib.error)


def _open_bytes(p: Path) -> IO[bytes]:
    """The file's bytes, gunzipped as they are read if the name ends in .gz."""
    return gzip.open(p, "rb") if p.name.endswith(".gz") else p.open("rb")


@contextmanager
def _reading(p: Path, where: list[int]) -> Iterator[None]:
    """A read error becomes an InputError naming the file, the record (``where[0]``) and
    the last line read whole (``where[1]``). The rest of the file cannot be read, so it
    stops the run even with --skip-invalid (those records would be lost without a count)."""
    try:
        yield
    except _READ_ERRORS as err:
        kind = "a complete gzip file" if p.name.endswith(".gz") else "a readable file"
        raise InputError(str(p), where[0], FILE_FIELD, "unreadable file", kind,
                         f"{type(err).__name__} ({err}) at record {where[0]}, after line "
                         f"{where[1]}",
                         fix="Re-download or rewrite the file.") from None


def _iter_jsonl(p: Path) -> Iterator[tuple[int, Any]]:
    """One record per non-blank line, streamed (gzipped or not); a line that is not
    UTF-8 or not JSON becomes an ``InputError`` for that record (skippable), the others
    still go through."""
    index = 0
    where = [0, 0]
    with _reading(p, where), _open_bytes(p) as f:
        for line_no, raw in enumerate(f, start=1):
            where[1] = line_no
            if not raw.strip():
                continue
            try:
                record: Any = json.loads(_decode(raw, line_no == 1))
            except UnicodeDecodeError as err:
                record = InputError(str(p), index, "<line>", "not UTF-8", "UTF-8 text",
                                    f"line {line_no}: byte {raw[err.start]:#04x} at column "
                                    f"{err.start + 1}", fix=REENCODE + " Or pass --skip-invalid "
                                    "to count and skip such records.")
            except json.JSONDecodeError as err:
                line = raw.decode("utf-8", errors="replace").strip()
                record = InputError(str(p), index, "<line>", "invalid JSON",
                                    "one JSON object per line",
                                    f"line {line_no} ({err.msg}): {line[:60]!r}")
            except RecursionError:
                record = InputError(str(p), index, "<line>", "nested too deeply",
                                    f"JSON nested less than {sys.getrecursionlimit()} levels",
                                    f"line {line_no}, {len(raw)} bytes")
            yield index, record
            index += 1
            where[0] = index


def _decode(raw: bytes, first: bool) -> str:
    """UTF-8 (a byte-order mark at the start of the file is allowed, as editors write it)."""
    return raw.decode("utf-8-sig" if first else "utf-8")


def _iter_json(p: Path) -> Iterator[tuple[int, Any]]:
    with _reading(p, [0, 0]), _open_bytes(p) as f:  # an array is parsed whole
        raw = f.read()
    try:
        text = _decode(raw, True)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(str(p), 0, FILE_FIELD, "not UTF-8", "UTF-8 text",
                         f"byte {raw[err.start]:#04x} at offset {err.start} (line {line})",
                         fix=REENCODE) from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise InputError(str(p), 0, FILE_FIELD, "nested too deeply",
                         f"JSON nested less than {sys.getrecursionlimit()} levels",
                         "deeper nesting", fix="Fix or remove the deeply nested value, or "
                         "write the records as JSON lines (then --skip-invalid can skip "
                         "such a record)") from None
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON lines under a .json name
            yield from _iter_jsonl(p)
            return
        raise InputError(str(p), 0, FILE_FIELD, "invalid JSON", "a JSON array of objects",
                         f"a parse error at line {err.lineno} column {err.colno} ({err.msg})",
                         fix="Fix the JSON at that place and rerun.") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise InputError(str(p), 0, FILE_FIELD, "wrong top-level value",
                         "a JSON array of objects (or JSON lines)", type(data).__name__)
    yield from enumerate(data)


def _iter_parquet(p: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    try:
        for batch in pq.ParquetFile(p).iter_batches(batch_size=_BATCH_ROWS):
            for record in batch.to_pylist():
                yield index, record
                index += 1
    except (pa.ArrowException, OSError) as err:  # not Parquet, truncated, damaged
        raise InputError(str(p), index, FILE_FIELD, "unreadable Parquet", "a complete Parquet "
                         "file", f"{type(err).__name__} after {index} records ({err})",
                         fix="Rewrite or re-download the file.") from None


def _iter_saved_dataset(p: Path, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:
        raise InputError(str(p), 0, FILE_FIELD, "not a saved dataset", SUPPORTED,
                         "a directory without dataset_info.json / state.json") from None
    except Exception as err:  # json, pyarrow and datasets each raise their own
        raise _damaged_saved_dataset(p, err) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(str(p), 0, FILE_FIELD, f"a DatasetDict without a {split!r} split",
                             f"a Dataset, or a DatasetDict with {split!r}", str(list(ds)),
                             fix="Choose a split with --dataset-split.")
        ds = ds[split]
    index = 0
    batches = ds.iter(batch_size=_BATCH_ROWS)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as err:  # a damaged Arrow file found while reading it
            raise _damaged_saved_dataset(p, err, index) from None
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            yield index, dict(zip(columns, values, strict=True))
            index += 1


def _damaged_saved_dataset(p: Path, err: Exception, index: int = 0) -> InputError:
    return InputError(str(p), index, FILE_FIELD, "damaged saved dataset",
                      "a folder written by datasets' save_to_disk",
                      f"{type(err).__name__}: {str(err)[:160]}",
                      fix="Save the dataset again (Dataset.save_to_disk), or pass its source "
                      "files as --data.")


@functools.lru_cache(maxsize=64)
def hub_snapshot(name: str) -> tuple[str | None, str]:
    """A Hub dataset's resolved revision (commit): offline (HF_HUB_OFFLINE=1), the hub
    cache's snapshot folder and its commit; online, ``(None, commit)`` asked of the Hub
    (the rows are then streamed from that commit)."""
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        if constants.HF_HUB_OFFLINE:
            folder = snapshot_download(name, repo_type="dataset", local_files_only=True)
            return folder, Path(folder).name
        return None, HfApi().dataset_info(name).sha
    except Exception as err:  # the hub client raises many kinds; the message is what matters
        raise InputError(name, 0, FILE_FIELD, "no such local path or Hub dataset", SUPPORTED,
                         f"{type(err).__name__}: {str(err).splitlines()[0][:200]}",
                         fix="Check the --data path or dataset id (offline, the dataset must "
                             "be in the hub cache: huggingface-cli download --repo-type "
                             "dataset NAME).") from None


def _iter_repository(where: str, subset: Subset, name: str) -> Iterator[tuple[int, Any]]:
    """A dataset repository (local folder, hub cache snapshot, or Hub id), streamed."""
    import datasets

    revision = None if os.path.isdir(where) else hub_snapshot(where)[1]
    try:
        ds = datasets.load_dataset(where, subset.config, split=subset.split, streaming=True,
                                   revision=revision)
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        raise InputError(name, 0, FILE_FIELD, "cannot read the dataset",
                         "a dataset repository with that config and split",
                         f"config {subset.config!r}, split {subset.split!r}: "
                         f"{str(err).splitlines()[0][:300]}",
                         fix="Check --dataset-config and --dataset-split.") from None
    yield from enumerate(ds)


def fingerprint_inputs(paths: tuple[str, ...], subset: Subset = DEFAULT_SUBSET) -> str:
    """SHA-256 over every input file's name and SHA-256 (a directory: its files, sorted);
    a Hub dataset: its id, resolved revision, config and split; a dataset repository
    folder: its files, config and split."""
    h = hashlib.sha256()
    for path in paths:
        saved = os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name))
                                            for name in _SAVED)
        # a saved dataset's split counts where it is not the default (older caches of
        # saved datasets keep their key)
        if is_hub_id(path) or (os.path.isdir(path) and not saved) or (
                saved and subset != DEFAULT_SUBSET):
            h.update(json.dumps(source_identity(path, subset), sort_keys=True).encode())
        if is_hub_id(path):
            continue
        files = sorted(Path(path).rglob("*")) if os.path.isdir(path) else [Path(path)]
        for f in files:
            if f.is_file():
                h.update(str(f.relative_to(path) if os.path.isdir(path) else f.name).encode())
                h.update(sha256_file(f).encode())
    return h.hexdigest()


def source_identity(path: str, subset: Subset) -> dict[str, Any]:
    """What names a dataset repository's rows: a Hub id with its resolved revision, or a
    local folder; with the config and split read."""
    base = {"dataset": path, "revision": hub_snapshot(path)[1]} if is_hub_id(path) else {}
    return {**base, "config": subset.config, "split": subset.split}
