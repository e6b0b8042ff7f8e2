"""Every input shape and file type, column mapping, and the errors for bad records."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DPO_DEMO, KTO_DEMO
from tiny import write_jsonl

from shared.errors import ConfigError, InputError
from shared.formats import (
    RecordRef,
    apply_column_map,
    detect_shape,
    parse_column_map,
    to_examples,
)
from shared.readers import iter_records


def examples_of(path, columns=None, shape="auto"):
    out, found = [], None
    for index, record in iter_records(str(path)):
        if isinstance(record, InputError):
            raise record
        ref = RecordRef(str(path), index)
        record = apply_column_map(record, columns or {})
        found = found if found or shape != "auto" else detect_shape(record, ref)
        out.extend(to_examples(record, found or shape, ref, index))
    return found or shape, out


def test_unpaired_text(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [
        {"prompt": "Hi", "completion": "Hello!", "label": True},
        {"prompt": "Hi", "completion": "Go away.", "label": 0}])
    shape, ex = examples_of(path)
    assert shape == "unpaired"
    assert [(e.side, e.label, e.prompt, e.completion) for e in ex] == [
        ("u", True, "Hi", "Hello!"), ("u", False, "Hi", "Go away.")]


def test_paired_text_splits_into_desirable_and_undesirable(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}])
    shape, ex = examples_of(path)
    assert shape == "paired"
    assert [(e.source_index, e.side, e.label, e.prompt, e.completion) for e in ex] == [
        (0, "c", True, "Q", "A"), (0, "r", False, "Q", "B")]


def test_implicit_prompt_text_cuts_after_last_shared_assistant_marker(tmp_path):
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Help?\n\nAssistant: Sure, gladly."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Help?\n\nAssistant: Sure, no."
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])
    shape, ex = examples_of(path)
    assert shape == "implicit_prompt"
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Help?\n\nAssistant:"
    assert [(e.prompt, e.completion) for e in ex] == [(prompt, " Sure, gladly."),
                                                      (prompt, " Sure, no.")]


def test_implicit_prompt_messages(tmp_path):
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}]
    record = {"chosen": turns + [{"role": "assistant", "content": "good"}],
              "rejected": turns + [{"role": "assistant", "content": "bad"}]}
    _, ex = examples_of(write_jsonl(tmp_path / "m.jsonl", [record]))
    assert ex[0].prompt == turns and ex[1].prompt == turns
    assert ex[0].completion == [{"role": "assistant", "content": "good"}]
    assert ex[1].completion == [{"role": "assistant", "content": "bad"}]


@pytest.mark.real_data
def test_messages_label_real_kto_demo():
    shape, ex = examples_of(KTO_DEMO)
    records = json.loads(KTO_DEMO.read_text())
    assert shape == "messages" and len(ex) == len(records) == 300
    assert sum(e.label for e in ex) == 150
    assert ex[0].prompt == records[0]["messages"][:-1]
    assert ex[0].completion == records[0]["messages"][-1:]


@pytest.mark.real_data
def test_sharegpt_pairs_real_dpo_demo():
    shape, ex = examples_of(DPO_DEMO)
    record = json.loads(DPO_DEMO.read_text())[0]
    assert shape == "sharegpt_pairs" and len(ex) == 600
    assert ex[0].prompt[0] == {"role": "user", "content": record["conversations"][0]["value"]}
    assert ex[0].completion == [{"role": "assistant", "content": record["chosen"]["value"]}]
    assert ex[1].completion == [{"role": "assistant", "content": record["rejected"]["value"]}]


def test_column_mapping_kto_tag_and_sharegpt_messages(tmp_path):
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
              "kto_tag": False}
    path = write_jsonl(tmp_path / "k.jsonl", [record])
    shape, ex = examples_of(path, parse_column_map(("label=kto_tag",)))
    assert shape == "messages"
    assert ex[0].label is False and ex[0].prompt == [{"role": "user", "content": "q"}]


def test_bad_column_mapping_is_a_config_error():
    with pytest.raises(ConfigError, match="CANONICAL=SOURCE"):
        parse_column_map(("kto_tag",))


@pytest.mark.parametrize("suffix", ["json", "jsonl", "parquet", "saved"])
def test_every_file_type_reads_the_same_records(tmp_path, suffix):
    records = [{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(5)]
    if suffix == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(records))
    elif suffix == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", records)
    elif suffix == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    assert [r for _, r in iter_records(str(path))] == records


BAD = [
    ({"prompt": "p", "label": True}, "completion", "missing field"),
    ({"prompt": "p", "completion": "c", "label": "maybe"}, "label", "wrong type"),
    ({"prompt": "p", "completion": 7, "label": True}, "completion", "wrong type"),
    ({"prompt": "p", "completion": "", "label": True}, "completion", "empty completion"),
    ({"prompt": [{"role": "robot", "content": "x"}],
      "completion": [{"role": "assistant", "content": "y"}], "label": True},
     "prompt[0].role", "malformed message"),
    ({"prompt": [{"role": "user", "content": 3}],
      "completion": [{"role": "assistant", "content": "y"}], "label": True},
     "prompt[0].content", "malformed message"),
]


@pytest.mark.parametrize("record,field,reason", BAD)
def test_bad_record_names_file_index_field_and_expectation(tmp_path, record, field, reason):
    good = {"prompt": "p", "completion": "c", "label": True}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(InputError) as info:
        examples_of(path, shape="unpaired")
    err = info.value
    assert (err.path, err.index, err.field, err.reason) == (str(path), 1, field, reason)
    assert f"{path}: record 1, field '{field}': {reason}: expected " in str(err)


def test_invalid_json_line_is_reported_with_its_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "p", "completion": "c", "label": true}\n{"prompt": oops}\n')
    with pytest.raises(InputError, match=r"record 1, field '<line>': invalid JSON: expected one "
                                         r"JSON object per line, got line 2"):
        examples_of(path)


def test_messages_without_final_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "q"}], "label": True}])
    with pytest.raises(InputError, match="field 'messages': malformed conversation"):
        examples_of(path)


def test_undetectable_shape_lists_the_fields(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(InputError, match=r"cannot detect the input format.*'answer', 'question'"):
        examples_of(path)
