"""Stage 1a: stream every input record once, validate it, render and tokenize it,
and spill the rows to an Arrow file so that memory stays flat whatever the
dataset size. Invalid records stop the run (default) or are counted by reason."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm.auto import tqdm

from precompute.prepare_vision import VisionEncoder, encode_vision_chunk, image_base
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
    identical_after_truncation,
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
            subset: Subset = DEFAULT_SUBSET, vision: VisionEncoder | None = None) -> Prepared:
    """``vision``: the reference is a vision-language model (``precompute.prepare_vision``);
    its rows carry their images."""
    invalid = InvalidLog(skip_invalid)
    files: list[dict[str, Any]] = []
    start = 0
    schema = vision.row_schema(ROW_SCHEMA) if vision else ROW_SCHEMA
    with pa.OSFile(str(spill), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for path in data:
            encode = _encoder(tokenizer, opts, invalid, vision, path)
            count, used_shape = _prepare_file(path, start, encode, shape, columns,
                                              invalid, (writer, schema), subset)
            files.append({"path": str(path), "records": count, "format": used_shape})
            start += count
    rows = pa.ipc.open_file(pa.memory_map(str(spill))).read_all()
    log.info("read %d records from %d file(s): %d rows, %d invalid records",
             start, len(files), rows.num_rows, sum(invalid.counts.values()))
    return Prepared(rows, files, invalid)


Encode = Callable[[list[tuple[Example, RecordRef]]], list[dict[str, Any]]]


def _encoder(tokenizer: Any, opts: TokenizeOptions, invalid: InvalidLog,
             vision: VisionEncoder | None, path: str) -> Encode:
    """A chunk of examples -> rows (dicts of the spill schema); invalid ones go to ``invalid``."""
    if vision is None:
        return lambda pending: [r.__dict__ for r in encode_chunk(pending, tokenizer, opts,
                                                                 invalid)]
    base = None if is_hub_id(path) else image_base(path)
    return lambda pending: encode_vision_chunk(pending, tokenizer, vision, opts, base,
                                               invalid.add)


def _prepare_file(path: str, start: int, encode: Encode, shape: str,
                  columns: Mapping[str, str], invalid: InvalidLog,
                  writer: tuple[pa.ipc.RecordBatchFileWriter, pa.Schema],
                  subset: Subset) -> tuple[int, str]:
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
                _flush(pending, encode, writer)
            invalid.add(err)
        if len(pending) >= _CHUNK:
            _flush(pending, encode, writer)
            pending = []
    _flush(pending, encode, writer)
    if shape_here is None and count:
        raise ConfigError(f"{path}: no record of {count} had a recognisable format (expected "
                          f"{SHAPE_FIELDS}; the first record's fields: {first_keys}). "
                          f"{unknown_format_fix(first_keys or [])}")
    return count, shape_here or "empty"


def _flush(pending: list[tuple[Example, RecordRef]], encode: Encode,
           writer: tuple[pa.ipc.RecordBatchFileWriter, pa.Schema]) -> None:
    rows = encode(pending)
    if rows:
        writer[0].write_batch(pa.RecordBatch.from_pylist(rows, schema=writer[1]))


def encode_chunk(pending: list[tuple[Example, RecordRef]], tokenizer: Any,
                 opts: TokenizeOptions, invalid: InvalidLog) -> list[TokenizedRow]:
    """Render and tokenize a chunk; a record with any invalid row is dropped whole
    (a pair never loses only one side) and counted once."""
    bad: dict[int, InputError] = {}
    rendered = []
    for ex, ref in pending:
        try:
            if ex.images:
                raise ref.error("images", "images for a text-only model",
                                "a vision-language --model (one with an image processor) for "
                                "records with images", f"{len(ex.images)} image(s)")
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
    for source_index, err in identical_after_truncation(rows, refs, opts).items():
        bad.setdefault(source_index, err)
    for source_index in sorted(bad):
        invalid.add(bad[source_index])
    return [r for r in rows if r.source_index not in bad]
