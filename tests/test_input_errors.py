"""A user's mistake in the input or the options gets one line naming the file, record,
field and fix, early; degenerate records are counted or refused, never silently kept."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import build_cache, read_cache
from reliability_helpers import assert_clean_error
from test_formats import examples_of
from test_precompute import synthetic
from tiny import write_jsonl

from precompute.cli import main
from shared.errors import ConfigError, InputError
from shared.tokenization import TokenizeOptions

LATIN1 = "Caf\u00e9 cr\u00e8me".encode("latin-1")


def cli(tiny_dir, data, out, *extra):
    return CliRunner().invoke(main, ["--model", str(tiny_dir), *[a for d in data for a in
                                     ("--data", str(d))], "--output", str(out),
                                     "--backend", "hf", *extra])


# ---- item 9: degenerate pairs and empty completions ------------------------------------
@pytest.mark.parametrize("record,field,reason", [
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "rejected", "chosen equals rejected"),
    ({"prompt": [{"role": "user", "content": "Q"}],
      "chosen": [{"role": "assistant", "content": "A"}],
      "rejected": [{"role": "assistant", "content": "A"}]}, "rejected", "chosen equals rejected"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}],
      "label": True}, "messages[1].content", "empty completion"),
    ({"prompt": "Q", "completion": [{"role": "assistant", "content": ""}], "label": False},
     "completion", "empty completion"),
    ({"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": ""},
      "rejected": {"from": "gpt", "value": "no"}}, "chosen", "empty completion"),
    ({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}],
      "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "no"}]},
     "chosen", "empty completion"),
])
def test_degenerate_records_are_invalid(tmp_path, record, field, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(InputError) as err:
        examples_of(path)
    assert (err.value.field, err.value.reason) == (field, reason)


def test_pairs_identical_after_truncation_are_counted(tiny_dir, tmp_path):
    """Chosen and rejected that differ only past --max-length would become two rows with
    one completion; with --skip-invalid they are counted under the same reason."""
    shared = "word " * 60
    data = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Q1", "chosen": shared + "yes", "rejected": shared + "no"},
        {"prompt": "Q2", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q3", "chosen": "fine", "rejected": "poor"}])
    with pytest.raises(InputError, match="record 0, field 'rejected': chosen equals rejected"):
        build_cache(tiny_dir, [data], tmp_path / "strict", max_length=32)
    build_cache(tiny_dir, [data], tmp_path / "out", max_length=32, skip_invalid=True)
    manifest, table = read_cache(tmp_path / "out")
    assert manifest["counts"]["invalid_by_reason"] == {"chosen equals rejected": 1}
    assert sorted(table["source_index"].to_pylist()) == [1, 1, 2, 2]


# ---- item 10: --max-prompt-length follows --max-length ---------------------------------
def test_max_prompt_length_defaults_to_half_of_max_length():
    assert TokenizeOptions(256).max_prompt_length == 128
    assert TokenizeOptions().max_prompt_length == 512
    assert TokenizeOptions(256, 200).max_prompt_length == 200
    with pytest.raises(ConfigError, match="--max-prompt-length 300 must be between 1 and "
                                          "--max-length 256; lower it"):
        TokenizeOptions(256, 300)


def test_max_length_alone_works_and_is_recorded(tiny_dir, tmp_path):
    data = synthetic(tmp_path, n=6)
    result = cli(tiny_dir, [data], tmp_path / "out", "--max-length", "256")
    assert result.exit_code == 0, result.output
    prep = read_cache(tmp_path / "out")[0]["preprocessing"]
    assert (prep["max_length"], prep["max_prompt_length"]) == (256, 128)
    assert_clean_error(cli(tiny_dir, [data], tmp_path / "bad", "--max-length", "256",
                           "--max-prompt-length", "300"), "--max-prompt-length 300")


def test_cache_key_unchanged_for_unchanged_effective_options(tiny_dir, tmp_path, tokenizer):
    """Existing caches made with the old defaults (1024, 512) keep their key."""
    from precompute.config import PrecomputeConfig
    from precompute.identity import cache_identity
    from shared.fingerprint import sha256_json

    data = synthetic(tmp_path, n=4)

    def key(tok):
        config = PrecomputeConfig(model=str(tiny_dir), data=(str(data),), output="o",
                                  tokenize=tok)
        return sha256_json(cache_identity(config, "hf", tokenizer))
    assert key(TokenizeOptions()) == key(TokenizeOptions(1024, 512))
    assert key(TokenizeOptions(256)) == key(TokenizeOptions(256, 128))
    assert key(TokenizeOptions(256)) != key(TokenizeOptions(256, 100))


# ---- item 11: non-UTF-8 input ------------------------------------------------------------
def test_non_utf8_line_names_the_record_and_can_be_skipped(tiny_dir, tmp_path):
    good = [json.dumps({"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0})
            for i in range(4)]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes("\n".join(good[:2]).encode() + b"\n" + b'{"prompt": "' + LATIN1
                     + b'", "completion": "x", "label": true}\n' + "\n".join(good[2:]).encode())
    assert_clean_error(cli(tiny_dir, [path], tmp_path / "out"), f"{path}: record 2, field "
                       "'<line>': not UTF-8", "line 3: byte 0xe9", "--skip-invalid")
    result = cli(tiny_dir, [path], tmp_path / "out", "--skip-invalid")
    assert result.exit_code == 0, result.output
    manifest = read_cache(tmp_path / "out")[0]
    assert manifest["counts"]["invalid_by_reason"] == {"not UTF-8": 1}
    assert manifest["counts"]["rows"] == 4


def test_non_utf8_json_file_is_a_file_error_without_skip_hint(tiny_dir, tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes(b'[{"prompt": "' + LATIN1 + b'", "completion": "x", "label": true}]')
    for extra in ((), ("--skip-invalid",)):
        line = assert_clean_error(cli(tiny_dir, [path], tmp_path / "out", *extra),
                                  f"{path}: not UTF-8", "offset 16", "iconv")
        assert "--skip-invalid" not in line


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    record = {"prompt": "Q", "completion": "A", "label": True}
    for name, text in (("bom.json", json.dumps([record])), ("bom.jsonl", json.dumps(record))):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert examples_of(path)[0] == "unpaired"


# ---- item 14: file-level errors do not advise --skip-invalid ----------------------------
@pytest.mark.parametrize("name,content,fragment", [
    ("broken.json", "[{\"prompt\": ", "invalid JSON"),
    ("data.csv", "prompt,completion\n", "unsupported file type"),
    ("scalar.json", "42", "wrong top-level value"),
    ("junk.parquet", "not parquet at all", "unreadable Parquet"),
])
def test_file_errors_name_the_file_and_a_fix_that_can_help(tiny_dir, tmp_path, name, content,
                                                           fragment):
    path = tmp_path / name
    path.write_text(content)
    line = assert_clean_error(cli(tiny_dir, [path], tmp_path / "out", "--skip-invalid"),
                              f"{path}: {fragment}")
    assert "--skip-invalid" not in line


def test_record_errors_still_advise_skip_invalid(tmp_path):
    with pytest.raises(InputError, match="pass --skip-invalid to count and skip"):
        examples_of(write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "label": True,
                                                        "completion": 5}]))


# ---- item 13: mistakes found early, machine errors in one line --------------------------
def test_negative_seed_is_refused_before_any_work(tiny_dir, tmp_path):
    from train.cli import main as train_main

    data = synthetic(tmp_path, n=4)
    assert_clean_error(cli(tiny_dir, [data], tmp_path / "out", "--seed", "-1"),
                       "--seed -1: expected an integer in [0, 4294967295]")
    result = CliRunner().invoke(train_main, ["--model", str(tiny_dir), "--cache", "c",
                                             "--output", str(tmp_path / "t"), "--seed", "-1"])
    assert_clean_error(result, "--seed -1")
    assert not (tmp_path / "t").exists()


def test_tokenizer_only_folder_as_model_fails_before_tokenization(tiny_dir, tmp_path):
    tok_only = tmp_path / "tok"
    tok_only.mkdir()
    for f in tiny_dir.iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            shutil.copy(f, tok_only / f.name)
    bad_first_record = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "label": True}])
    assert_clean_error(cli(tok_only, [bad_first_record], tmp_path / "out"),
                       f"--model {tok_only}: {tok_only} has no config.json")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /sys and /dev/full")
def test_unwritable_output_is_one_line(tiny_dir, tmp_path):
    data = synthetic(tmp_path, n=4)
    assert_clean_error(cli(tiny_dir, [data], "/sys/kto-cache-test/out"),
                       "cannot access /sys/kto-cache-test", "choose a folder you can write")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_is_one_line_and_leaves_no_temporary_file(tiny_dir, tmp_path, monkeypatch):
    """The manifest's temporary file is opened on /dev/full, whose every write fails with
    ENOSPC, as a full disk's would (a link planted there would be refused, not followed)."""
    from shared import files

    data = synthetic(tmp_path, n=4)
    out = tmp_path / "out"
    real_open_new = files.open_new

    def full_disk_for_the_manifest(path):
        return open("/dev/full", "wb") if path.name.startswith(".manifest.json.tmp") \
            else real_open_new(path)

    monkeypatch.setattr(files, "open_new", full_disk_for_the_manifest)
    line = assert_clean_error(cli(tiny_dir, [data], out),
                              f"cannot write {out / 'manifest.json'}: No space left on device",
                              "free space on that disk")
    assert "Traceback" not in line and not list(out.glob(".*.tmp-*"))
    monkeypatch.setattr(files, "open_new", real_open_new)
    assert cli(tiny_dir, [data], out).exit_code == 0  # space back: the rerun finishes
    assert len(list(Path(out).glob("shard-*.parquet"))) == 1
