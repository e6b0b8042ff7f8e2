"""Helpers for the reliability tests: clean one-line errors, strict JSON, damaging a
shard at a chosen column."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq


def assert_clean_error(result, *fragments: str, code: int = 1) -> str:
    """A CliRunner result that is a user error: the exit code, no traceback, one line
    after 'Error: ' holding every fragment."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    # stderr is mixed in: a progress bar may precede the message on its line
    [line] = [x[x.index("Error: "):] for x in result.output.splitlines() if "Error: " in x]
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def strict_loads(text: str):
    """json.loads that refuses NaN and Infinity (not JSON, though Python writes them)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def flip_bit_in_column(path: Path, column: str, where: float = 0.5) -> int:
    """Flip one bit inside the data of ``column``'s column chunk (``where`` of the way
    through it); returns the byte offset."""
    meta = pq.read_metadata(path).row_group(0)
    [chunk] = [meta.column(i) for i in range(meta.num_columns)
               if meta.column(i).path_in_schema.split(".")[0] == column]
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    offset = start + int(chunk.total_compressed_size * where)
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))
    return offset


def edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value, indent=2))


PRECIOUS = "precious\n"


def planted_output(tmp_path: Path, name: str, hard: bool = False) -> tuple[Path, Path]:
    """(out, victim): a new output folder where ``name`` is a link (symbolic, or ``hard``)
    to a file of someone else's holding PRECIOUS."""
    victim = tmp_path / "victim.txt"
    victim.write_text(PRECIOUS)
    out = tmp_path / "out"
    out.mkdir()
    if hard:
        os.link(victim, out / name)
    else:
        (out / name).symlink_to(victim)
    return out, victim
