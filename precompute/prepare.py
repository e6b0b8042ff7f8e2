"""Stage 1a: stream every input record once, validate it, render and tokenize it,
and spill the rows to an Arrow file so that memory stays flat whatever the
dataset size. Invalid records stop the run (default) or are counted by reason."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm.auto import tqdm

from shared.cache import SCHEMA
from shared.errors import ConfigError, InputError
from shared.formats import (
    SHAPE_FIELDS,
    Example,
    RecordRef,
    apply_column_map,
    detect_shape,
    to_examples,
    unknown_format_fix,
)
from shared.readers import DEFAULT_SUBSET, Subset, is_hub_id, iter_records
from shared.tokenization import (
    TokenizedRow,
    TokenizeOptions,
    check_lengths,
    encode_texts,
    render_texts,
    row_id,
    truncate,
)

log = logging.getLogger(__name__)

# the cache's own columns, before KL pairing and scoring add the rest
ROW_SCHEMA = pa.schema([SCHEMA.field(name) for name in
                        ("id", "source_index", "label", "prompt_ids", "completion_ids")])
_CHUNK = 512  # examples tokenized per call of the (Rust, batched) tokenizer
_SAMPLES_PER_REASON = 10


@dataclass
class InvalidLog:
    """Invalid records: raised at once, or counted by reason with a few samples."""

    skip: bool
    counts: Counter = field(default_factory=Counter)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))

    def add(self, err: InputError) -> None:
        if not self.skip:
            raise err
        self.counts[err.reason] += 1
        if len(self.samples[err.reason]) < _SAMPLES_PER_REASON:
            self.samples[err.reason].append(
                {"file": err.path, "index": err.index, "field": err.field})


@dataclass
class Prepared:
    rows: pa.Table  # ROW_SCHEMA, memory-mapped from the spill file
    files: list[dict[str, Any]]
    invalid: InvalidLog

    @property
    def records(self) -> int:
        return sum(f["records"] for f in self.files)


def prepare(data: tuple[str, ...], tokenizer: Any, opts: TokenizeOptions, shape: str,
            columns: Mapping[str, str], skip_invalid: bool, spill: Path,
            subset: Subset = DEFAULT_SUBSET) -> Prepared:
    invalid = InvalidLog(skip_invalid)
    files: list[dict[str, Any]] = []
    start = 0
    with pa.OSFile(str(spill), "wb") as sink, pa.ipc.new_file(sink, ROW_SCHEMA) as writer:
        for path in data:
            count, used_shape = _prepare_file(path, start, tokenizer, opts, shape, columns,
                                              invalid, writer, subset)
            files.append({"path": str(path), "records": count, "format": used_shape})
            start += count
    rows = pa.ipc.open_file(pa.memory_map(str(spill))).read_all()
    log.info("read %d records from %d file(s): %d rows, %d invalid records",
             start, len(files), rows.num_rows, sum(invalid.counts.values()))
    return Prepared(rows, files, invalid)


def _prepare_file(path: str, start: int, tokenizer: Any, opts: TokenizeOptions, shape: str,
                  columns: Mapping[str, str], invalid: InvalidLog,
                  writer: pa.ipc.RecordBatchFileWriter, subset: Subset) -> tuple[int, str]:
    pending: list[tuple[Example, RecordRef]] = []
    shape_here = None if shape == "auto" else shape
    count = 0
    first_keys: list[str] | None = None  # the first record's fields, for the error below
    name = path if is_hub_id(path) else Path(path).name
    for index, record in tqdm(iter_records(path, subset), desc=f"tokenize {name}",
                              unit="rec", mininterval=1.0):
        count += 1
        ref = RecordRef(str(path), index)
        try:
            if isinstance(record, InputError):
                raise record
            if isinstance(record, Mapping):
                record = apply_column_map(record, columns)
                first_keys = sorted(map(str, record)) if first_keys is None else first_keys
            shape_here = shape_here or detect_shape(record, ref)
            pending.extend((ex, ref) for ex in to_examples(record, shape_here, ref,
                                                           start + index))
        except InputError as err:
            if not invalid.skip:  # report an earlier record's tokenization error first
                _flush(pending, tokenizer, opts, invalid, writer)
            invalid.add(err)
        if len(pending) >= _CHUNK:
            _flush(pending, tokenizer, opts, invalid, writer)
            pending = []
    _flush(pending, tokenizer, opts, invalid, writer)
    if shape_here is None and count:
        raise ConfigError(f"{path}: no record of {count} had a recognisable format (expected "
                          f"{SHAPE_FIELDS}; the first record's fields: {first_keys}). "
                          f"{unknown_format_fix(first_keys or [])}")
    return count, shape_here or "empty"


def _flush(pending: list[tuple[Example, RecordRef]], tokenizer: Any, opts: TokenizeOptions,
           invalid: InvalidLog, writer: pa.ipc.RecordBatchFileWriter) -> None:
    rows = encode_chunk(pending, tokenizer, opts, invalid)
    if rows:
        writer.write_batch(pa.RecordBatch.from_pylist(
            [r.__dict__ for r in rows], schema=ROW_SCHEMA))


def encode_chunk(pending: list[tuple[Example, RecordRef]], tokenizer: Any,
                 opts: TokenizeOptions, invalid: InvalidLog) -> list[TokenizedRow]:
    """Render and tokenize a chunk; a record with any invalid row is dropped whole
    (a pair never loses only one side) and counted once."""
    bad: dict[int, InputError] = {}
    rendered = []
    for ex, ref in pending:
        try:
            rendered.append((ex, ref, *render_texts(ex, tokenizer, ref)))
        except InputError as err:
            bad.setdefault(ex.source_index, err)
    p_all, c_all = encode_texts(tokenizer, [r[2] for r in rendered], [r[3] for r in rendered])
    rows, refs = [], {}
    for (ex, ref, _, _), p_ids, c_ids in zip(rendered, p_all, c_all, strict=True):
        p_ids, c_ids = truncate(p_ids, c_ids, opts)
        err = check_lengths(p_ids, c_ids, ref, opts)
        if err is not None:
            bad.setdefault(ex.source_index, err)
            continue
        rows.append(TokenizedRow(row_id(ex), ex.source_index, ex.label, p_ids, c_ids))
        refs[ex.source_index] = ref
    for source_index, err in _identical_after_truncation(rows, refs, opts).items():
        bad.setdefault(source_index, err)
    for source_index in sorted(bad):
        invalid.add(bad[source_index])
    return [r for r in rows if r.source_index not in bad]


def _identical_after_truncation(rows: list[TokenizedRow], refs: dict[int, RecordRef],
                                opts: TokenizeOptions) -> dict[int, InputError]:
    """Pairs whose chosen and rejected differ only past --max-length: after truncation both
    rows hold the same completion, a degenerate pair (as chosen == rejected)."""
    sides: dict[int, dict[bool, list[int]]] = {}
    for r in rows:
        if r.id.split("-")[1] in ("c", "r"):
            sides.setdefault(r.source_index, {})[r.label] = r.completion_ids
    return {i: InputError(refs[i].path, refs[i].index, "rejected", "chosen equals rejected",
                          "chosen and rejected that differ within --max-length "
                          f"{opts.max_length}", "identical completions after truncation")
            for i, pair in sides.items() if len(pair) == 2 and pair[True] == pair[False]}
