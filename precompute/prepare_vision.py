"""Stage 1a for vision-language models: each example's images are read (a path relative
to the data file's folder, bytes, a ``datasets`` Image value, a PIL image) and checked to
decode; the prompt is rendered with one image token per image and expanded by the
model's HF processor, so the cache's prompt ids are what the model sees. A record whose
placeholders and images differ, whose image is missing or undecodable, or whose
truncation would cut an image is invalid (named; counted with --skip-invalid)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from shared.errors import InputError
from shared.formats import Example, RecordRef
from shared.images import StoredImage, decode, load_image
from shared.tokenization import (
    TokenizedRow,
    TokenizeOptions,
    check_lengths,
    identical_after_truncation,
    row_id,
    special_ids,
)
from shared.vision import (
    VISION_FIELDS,
    VisionSpec,
    check_placeholders,
    encode_completion,
    expand_prompt,
    image_offsets,
    image_span,
    placeholder_prompt,
    render_vision_texts,
    truncate_vision,
)

log = logging.getLogger(__name__)


@dataclass
class VisionEncoder:
    """The processor and what an encoding run learns: the tokens each image becomes, by
    SHA-256 (one image that serves many rows is expanded once)."""

    processor: Any
    spec: VisionSpec
    span_by_image: dict[str, list[int]] = field(default_factory=dict)

    def row_schema(self, base: pa.Schema) -> pa.Schema:
        return pa.schema([*base, *VISION_FIELDS])


def image_base(path: str) -> Path | None:
    """The folder relative image paths are read from: the data file's (or data folder)."""
    p = Path(path)
    if p.is_file():
        return p.resolve().parent
    return p.resolve() if p.is_dir() else None


def encode_vision_example(ex: Example, ref: RecordRef, tokenizer: Any, enc: VisionEncoder,
                          opts: TokenizeOptions, base: Path | None
                          ) -> tuple[TokenizedRow, dict[str, Any]]:
    """One example as a cache row and its vision columns; InputError when invalid."""
    prompt_text, completion_text = render_vision_texts(ex, enc.processor, ref)
    check_placeholders(prompt_text, completion_text, len(ex.images), enc.spec.image_token, ref)
    stored = [load_image(v, base, ref, f"images[{i}]") for i, v in enumerate(ex.images)]
    pictures = [decode(s.data) for s in stored]
    bos, _ = special_ids(tokenizer)
    prompt_ids = expand_prompt(enc.processor, prompt_text, pictures, bos)
    spans = [_span_of(enc, s, p) for s, p in zip(stored, pictures, strict=True)]
    try:
        offsets = image_offsets(placeholder_prompt(tokenizer, prompt_text, bos), prompt_ids,
                                enc.spec.image_token_id, spans)
    except ValueError as err:
        raise ref.error("images", "image expansion not understood",
                        "a processor that expands each placeholder into one span of tokens",
                        str(err)) from None
    completion_ids = encode_completion(tokenizer, completion_text)
    lengths = [len(s) for s in spans]
    p_ids, c_ids, offsets = truncate_vision(prompt_ids, completion_ids, offsets, lengths,
                                            opts, ref)
    err = check_lengths(p_ids, c_ids, ref, opts)
    if err is not None:
        raise err
    row = TokenizedRow(row_id(ex), ex.source_index, ex.label, p_ids, c_ids)
    return row, vision_columns(stored, offsets, lengths)


def _span_of(enc: VisionEncoder, image: StoredImage, picture: Any) -> list[int]:
    if image.sha256 not in enc.span_by_image:
        enc.span_by_image[image.sha256] = image_span(enc.processor, picture)
    return enc.span_by_image[image.sha256]


def vision_columns(stored: list[StoredImage], offsets: list[int],
                   lengths: list[int]) -> dict[str, Any]:
    """No path back to the source data: the bytes are the image."""
    return {"images": [{"bytes": s.data, "path": None} for s in stored],
            "image_sha256": [s.sha256 for s in stored], "image_offsets": offsets,
            "image_tokens": lengths}


def encode_vision_chunk(pending: list[tuple[Example, RecordRef]], tokenizer: Any,
                        enc: VisionEncoder, opts: TokenizeOptions, base: Path | None,
                        add_invalid) -> list[dict[str, Any]]:
    """Like ``prepare.encode_chunk``: a record with any invalid row is dropped whole."""
    bad: dict[int, InputError] = {}
    rows: list[tuple[TokenizedRow, dict[str, Any]]] = []
    refs: dict[int, RecordRef] = {}
    for ex, ref in pending:
        if ex.source_index in bad:
            continue
        try:
            rows.append(encode_vision_example(ex, ref, tokenizer, enc, opts, base))
            refs[ex.source_index] = ref
        except InputError as err:
            bad.setdefault(ex.source_index, err)
    for source_index, err in identical_after_truncation([r for r, _ in rows], refs,
                                                        opts).items():
        bad.setdefault(source_index, err)
    for source_index in sorted(bad):
        add_invalid(bad[source_index])
    return [{**row.__dict__, **extra} for row, extra in rows if row.source_index not in bad]
