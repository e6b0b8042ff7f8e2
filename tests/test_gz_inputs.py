"""Gzipped inputs (.json.gz, .jsonl.gz: HH-RLHF ships gzipped JSON lines): the same records
and the same cache as the plain file, JSON lines read as a stream, and a damaged file
named with the record where reading stopped."""

from __future__ import annotations

import gzip
import json

import pytest
from click.testing import CliRunner
from conftest import DPO_DEMO, KTO_DEMO, REAL_OPTS, build_cache, read_cache

from precompute.cli import main
from shared.errors import InputError
from shared.readers import fingerprint_inputs, iter_records


def gzip_copy(src, dst):
    dst.write_bytes(gzip.compress(src.read_bytes(), mtime=0))
    return dst


def jsonl_gz(path, records):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def test_gzipped_real_demo_gives_the_identical_cache(hf_real_caches, tiny_dir, tmp_path):
    gz = gzip_copy(KTO_DEMO, tmp_path / "kto_en_demo.json.gz")
    build_cache(tiny_dir, [gz], tmp_path / "cache", **REAL_OPTS)
    plain_manifest, plain = read_cache(hf_real_caches / "kto")
    gz_manifest, table = read_cache(tmp_path / "cache")
    assert table.num_rows == 300 and table.equals(plain)  # every row, every column
    assert gz_manifest["counts"] == plain_manifest["counts"]
    assert gz_manifest["tokens"] == plain_manifest["tokens"]
    assert gz_manifest["data"]["files"][0]["format"] == "messages"
    # the data fingerprint stays the SHA-256 of the bytes given (the gzip file's)
    assert gz_manifest["data"]["fingerprint"] == fingerprint_inputs((str(gz),))
    assert gz_manifest["data"]["fingerprint"] != plain_manifest["data"]["fingerprint"]


@pytest.mark.real_data
def test_jsonl_gz_reads_the_same_records_as_the_plain_file(tmp_path):
    records = json.loads(DPO_DEMO.read_text())
    gz = jsonl_gz(tmp_path / "dpo.jsonl.gz", records)
    assert [r for _, r in iter_records(str(gz))] == records
    assert [i for i, _ in iter_records(str(gz))] == list(range(len(records)))


def test_jsonl_gz_is_streamed_and_a_truncated_file_names_the_record(tmp_path):
    records = [{"prompt": f"p{i}", "completion": "c" * 200 + str(i), "label": i % 2 == 0}
               for i in range(2000)]
    full = jsonl_gz(tmp_path / "full.jsonl.gz", records).read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(full[:len(full) // 2])
    seen = []
    with pytest.raises(InputError) as info:
        for index, record in iter_records(str(cut)):
            assert isinstance(record, dict | InputError)
            seen.append(index)
    # records before the damage came out one by one (a whole-file read would yield none)
    assert len(seen) > 100 and seen == list(range(len(seen)))
    msg = str(info.value)
    assert msg.startswith(f"{cut}: unreadable file") and f"at record {info.value.index}," in msg
    assert "expected a complete gzip file, got EOFError" in msg
    assert info.value.index >= len(seen) - 1


def test_truncated_gzip_is_a_one_line_cli_error(tiny_dir, tmp_path):
    full = jsonl_gz(tmp_path / "full.jsonl.gz", [
        {"prompt": f"p{i}", "completion": f"c{i}", "label": True} for i in range(3000)])
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(full.read_bytes()[:-40])
    result = CliRunner().invoke(main, ["--model", str(tiny_dir), "--data", str(cut),
                                       "--output", str(tmp_path / "out"), "--backend", "hf",
                                       "--skip-invalid"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Error: {cut}: unreadable file" in result.output and "at record " in result.output
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_non_utf8_line_is_an_invalid_record_named_by_line(tmp_path):
    path = tmp_path / "latin1.jsonl.gz"
    jsonl_gz(path, [{"prompt": "a", "completion": "b", "label": True}])
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())
                                   + '{"prompt": "caf\u00e9"}\n'.encode("latin-1")))
    (_, good), (_, bad) = iter_records(str(path))
    assert good == {"prompt": "a", "completion": "b", "label": True}
    assert isinstance(bad, InputError)  # a record error: stops the run, or counted if skipped
    assert str(bad).startswith(f"{path}: record 1, field '<line>': not UTF-8: expected "
                               "UTF-8 text, got line 2: byte 0xe9 at column 16")


@pytest.mark.real_data
def test_unsupported_compressed_type_names_both_suffixes(tmp_path):
    path = gzip_copy(KTO_DEMO, tmp_path / "data.csv.gz")
    with pytest.raises(InputError, match=r"unsupported file type: expected .*\.jsonl\.gz.*, "
                                         r"got '\.csv\.gz'"):
        list(iter_records(str(path)))
