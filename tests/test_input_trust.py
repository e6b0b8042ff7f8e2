"""Odd data is a named, skippable invalid record (or one line naming the file), never a
traceback; labels written the way common tools write them are read."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from reliability_helpers import assert_clean_error
from tiny import write_jsonl

from precompute.cli import main

GOOD = [{"prompt": f"Question {i}: what is {i}?", "completion": f"It is {i}.",
         "label": i % 2 == 0} for i in range(8)]


def run(tiny_dir, data, out, *extra):
    return CliRunner().invoke(main, ["--model", str(tiny_dir), "--data", str(data), "--output",
                                     str(out), "--backend", "hf", *extra])


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_a_lone_surrogate_is_a_named_skippable_record(tiny_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "bad \\ud800 text", "completion": "x", "label": true}\n'
                    + "".join(json.dumps(r) + "\n" for r in GOOD))
    assert_clean_error(run(tiny_dir, data, tmp_path / "a"), "record 0, field 'prompt'",
                       "not valid Unicode")
    skipped = run(tiny_dir, data, tmp_path / "b", "--skip-invalid")
    assert skipped.exit_code == 0, skipped.output
    assert manifest(tmp_path / "b")["counts"]["invalid_by_reason"] == {"not valid Unicode": 1}


def test_json_nested_too_deeply(tiny_dir, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    lines = tmp_path / "d.jsonl"
    lines.write_text(f'{{"prompt": {deep}, "completion": "x", "label": true}}\n'
                     + "".join(json.dumps(r) + "\n" for r in GOOD))
    assert_clean_error(run(tiny_dir, lines, tmp_path / "a"), "record 0", "nested too deeply")
    skipped = run(tiny_dir, lines, tmp_path / "b", "--skip-invalid")
    assert skipped.exit_code == 0, skipped.output
    assert manifest(tmp_path / "b")["counts"]["invalid_by_reason"] == {"nested too deeply": 1}
    array = tmp_path / "d.json"
    array.write_text(f'[{{"prompt": {deep}, "completion": "x", "label": true}}]')
    assert_clean_error(run(tiny_dir, array, tmp_path / "c"), "d.json", "nested too deeply")


@pytest.mark.parametrize("damage", ["state.json", "dataset_info.json", "arrow"])
def test_a_damaged_saved_dataset_is_one_line(tiny_dir, tmp_path, damage):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(GOOD).save_to_disk(str(folder))
    if damage == "arrow":
        [arrow] = folder.glob("*.arrow")
        arrow.write_bytes(arrow.read_bytes()[:100])
    else:
        (folder / damage).write_text("{cut")
    assert_clean_error(run(tiny_dir, folder, tmp_path / "out"), "damaged saved dataset",
                       "save_to_disk")


@pytest.mark.parametrize("written, meaning", [
    ("true", True), ("False", False), (" yes ", True), ("no", False), ("1", True), ("0", False),
    ("desirable", True), ("undesirable", False), (1.0, True), (0.0, False)])
def test_labels_as_common_tools_write_them(tiny_dir, tmp_path, written, meaning):
    records = [{**r, "label": written if i == 0 else r["label"]} for i, r in enumerate(GOOD)]
    out = tmp_path / "out"
    result = run(tiny_dir, write_jsonl(tmp_path / "d.jsonl", records), out)
    assert result.exit_code == 0, result.output
    counts = manifest(out)["counts"]
    assert counts["desirable"] == 3 + meaning  # GOOD's rows 2, 4, 6 and row 0 as written


@pytest.mark.parametrize("written", ["maybe", 2, 0.5, "tru"])
def test_an_ambiguous_label_lists_the_accepted_forms(tiny_dir, tmp_path, written):
    records = [{**GOOD[0], "label": written}, *GOOD[1:]]
    result = run(tiny_dir, write_jsonl(tmp_path / "d.jsonl", records), tmp_path / "out")
    assert_clean_error(result, "field 'label'", "0.0/1.0", "desirable/undesirable")


def test_a_saved_dataset_still_reads(tiny_dir, tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(GOOD).save_to_disk(str(folder))
    result = run(tiny_dir, folder, tmp_path / "out")
    assert result.exit_code == 0, result.output
    shutil.rmtree(tmp_path / "out")
