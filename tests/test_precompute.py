"""kto-precompute end to end with the transformers backend: real data, the cache
contract, resume after kill -9, workers, bad input, verification."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import build_cache, read_cache
from helpers import assert_close, naive_logps
from tiny import write_jsonl

from precompute.cli import main
from shared.cache import SCHEMA, verify_cache
from shared.errors import CacheError, ConfigError
from shared.fingerprint import tokenizer_fingerprint

TESTS = Path(__file__).parent


def synthetic(tmp_path, n=40, name="data.jsonl"):
    records = [{"prompt": f"Question {i % 15}: what is {i}?", "completion": f"It is {i}.",
                "label": i % 3 != 0} for i in range(n)]
    return write_jsonl(tmp_path / name, records)


@pytest.mark.parametrize("name,rows", [("kto", 300), ("dpo", 600)])
def test_real_files_through_hf(hf_real_caches, tokenizer, name, rows):
    manifest, table = read_cache(hf_real_caches / name)
    assert table.schema.equals(SCHEMA, check_metadata=False)
    assert manifest["counts"]["rows"] == table.num_rows == rows
    assert manifest["counts"]["desirable"] == manifest["counts"]["undesirable"] == rows // 2
    assert manifest["counts"]["invalid"] == 0
    assert manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert manifest["backend"]["name"] == "hf"
    ids = table["id"].to_pylist()
    assert len(set(ids)) == rows
    verify_cache(hf_real_caches / name)


def test_kl_pairs_in_cache_follow_the_rules(hf_real_caches):
    manifest, table = read_cache(hf_real_caches / "dpo")
    rows = table.to_pylist()
    by_id = {r["id"]: r for r in rows}
    start = 0
    for shard in manifest["shards"]:
        shard_ids = {r["id"] for r in rows[start:start + shard["rows"]]}
        for r in rows[start:start + shard["rows"]]:
            partner = by_id[r["kl_partner"]]
            assert r["kl_partner"] != r["id"] and r["kl_partner"] in shard_ids
            assert partner["prompt_ids"] != r["prompt_ids"]
            cut = 512 - len(r["prompt_ids"])
            assert r["kl_completion_ids"] == partner["completion_ids"][:cut]
        start += shard["rows"]


def test_cached_values_equal_naive_oracle(hf_real_caches, model):
    _, table = read_cache(hf_real_caches / "kto")
    sample = table.slice(0, 12).to_pylist()
    target = [(r["prompt_ids"], r["completion_ids"]) for r in sample]
    kl = [(r["prompt_ids"], r["kl_completion_ids"]) for r in sample]
    assert_close([r["ref_logps"] for r in sample], naive_logps(model, target), what="ref_logps")
    assert_close([r["ref_kl_logps"] for r in sample], naive_logps(model, kl), what="ref_kl")


def test_resume_after_kill_equals_uninterrupted_run(tiny_dir, tmp_path):
    data = synthetic(tmp_path, n=60)
    args = ["--model", str(tiny_dir), "--data", str(data), "--backend", "hf",
            "--shard-size", "8", "--output"]
    crashed = tmp_path / "crashed"
    tmpdir = tmp_path / "TMPDIR"
    tmpdir.mkdir()
    proc = subprocess.run([sys.executable, str(TESTS / "crash_driver.py"), "3", *args,
                           str(crashed)], capture_output=True, text=True, cwd=TESTS.parent,
                          env={**os.environ, "TMPDIR": str(tmpdir)})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not list(tmpdir.iterdir())  # the rows' spill file went before scoring began
    assert not (crashed / "manifest.json").exists()
    assert len(list(crashed.glob("shard-*.parquet"))) == 3
    assert len(list(crashed.glob(".shard-*.tmp-*"))) == 1  # the half-written shard

    resumed = build_cache(tiny_dir, [data], crashed, shard_size=8)
    assert resumed["rows_scored_now"] == 60 - 3 * 8
    assert not list(crashed.glob(".shard-*.tmp-*"))
    build_cache(tiny_dir, [data], tmp_path / "clean", shard_size=8)
    assert read_cache(crashed)[0] == read_cache(tmp_path / "clean")[0]  # same SHA-256s


def test_workers_union_equals_single_run(tiny_dir, tmp_path):
    data = synthetic(tmp_path, n=50)
    build_cache(tiny_dir, [data], tmp_path / "single", shard_size=7)
    for i in range(3):
        build_cache(tiny_dir, [data], tmp_path / f"w{i}", shard_size=7, num_workers=3,
                    worker_index=i)
    assert not (tmp_path / "w0" / "manifest.json").exists()
    parts = [a for i in range(3) for a in ("--part", str(tmp_path / f"w{i}"))]
    result = CliRunner().invoke(main, ["combine", str(tmp_path / "all"), *parts])
    assert result.exit_code == 0, result.output
    single_manifest, single = read_cache(tmp_path / "single")
    combined_manifest, combined = read_cache(tmp_path / "all")
    assert combined.to_pylist() == single.to_pylist()
    assert combined_manifest == single_manifest


def test_combine_refuses_missing_worker(tiny_dir, tmp_path):
    data = synthetic(tmp_path, n=20)
    build_cache(tiny_dir, [data], tmp_path / "out", shard_size=5, num_workers=2, worker_index=0)
    result = CliRunner().invoke(main, ["combine", str(tmp_path / "out")])
    assert result.exit_code != 0 and "missing [1]: run those workers first" in result.output


def test_bad_record_stops_with_clear_error_and_writes_no_cache(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "p", "completion": "c", "label": True},
        {"prompt": "p", "completion": "d", "label": False},
        {"prompt": "p", "label": True}])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--model", str(tiny_dir), "--data", str(data),
                                       "--output", str(out), "--backend", "hf"])
    assert result.exit_code == 1
    assert (f"Error: {data}: record 2, field 'completion': missing field: expected a value "
            "for 'completion'") in result.output
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit
    assert not list(out.glob("*"))


def test_skip_invalid_counts_reasons_in_manifest(tiny_dir, tmp_path):
    good = [{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(6)]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in good[:3]) + "{not json\n"
                    + json.dumps({"prompt": "p", "completion": "", "label": True}) + "\n"
                    + json.dumps({"prompt": "x" * 3000, "completion": "c", "label": True}) + "\n"
                    + "".join(json.dumps(r) + "\n" for r in good[3:]))
    build_cache(tiny_dir, [data], tmp_path / "out", skip_invalid=True, max_length=64,
                max_prompt_length=64)
    manifest, table = read_cache(tmp_path / "out")
    counts = manifest["counts"]
    assert (counts["records"], counts["rows"], counts["invalid"]) == (9, 6, 3)
    assert counts["invalid_by_reason"] == {"empty completion": 1, "invalid JSON": 1,
                                           "prompt longer than max_length": 1}
    assert counts["invalid_samples"]["invalid JSON"] == [
        {"file": str(data), "index": 3, "field": "<line>"}]
    assert sorted(table["source_index"].to_pylist()) == [0, 1, 2, 6, 7, 8]


def test_rerun_with_other_settings_refuses_then_overwrites(tiny_dir, tmp_path):
    data = synthetic(tmp_path, n=10)
    build_cache(tiny_dir, [data], tmp_path / "out", seed=1)
    with pytest.raises(CacheError, match="other settings"):
        build_cache(tiny_dir, [data], tmp_path / "out", seed=2)
    build_cache(tiny_dir, [data], tmp_path / "out", seed=2, overwrite=True)
    assert read_cache(tmp_path / "out")[0]["preprocessing"]["seed"] == 2


def test_verify_names_a_damaged_shard(tiny_dir, tmp_path):
    data = synthetic(tmp_path, n=20)
    build_cache(tiny_dir, [data], tmp_path / "out", shard_size=10)
    ok = CliRunner().invoke(main, ["verify", str(tmp_path / "out")])
    assert ok.exit_code == 0 and "rows            : 20 (13 desirable, 7 undesirable)" in ok.output
    shard = tmp_path / "out" / "shard-00001-of-00002.parquet"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    bad = CliRunner().invoke(main, ["verify", str(tmp_path / "out")])
    assert bad.exit_code == 1
    assert "shard shard-00001-of-00002.parquet is damaged" in bad.output


def test_config_file_sets_defaults_and_flags_win(tiny_dir, tmp_path):
    data = synthetic(tmp_path, n=10)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_dir}\nbackend: hf\nseed: 5\nshard-size: 4\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--config", str(config), "--data", str(data),
                                       "--output", str(out), "--seed", "6"])
    assert result.exit_code == 0, result.output
    prep = read_cache(out)[0]["preprocessing"]
    assert (prep["seed"], prep["shard_size"]) == (6, 4)


def test_multiple_files_get_one_global_record_index(tiny_dir, tmp_path):
    a = synthetic(tmp_path, n=5, name="a.jsonl")
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "chosen": "y", "rejected": "n"}])
    build_cache(tiny_dir, [a, b], tmp_path / "out")
    manifest, table = read_cache(tmp_path / "out")
    assert [f["format"] for f in manifest["data"]["files"]] == ["unpaired", "paired"]
    assert sorted(table["source_index"].to_pylist()) == [0, 1, 2, 3, 4, 5, 5]
    assert np.isfinite(table["ref_logps"].to_numpy()).all()


def test_sequences_beyond_the_models_positions_are_refused(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "long.jsonl", [
        {"prompt": "word " * 1500, "completion": "ok " * 900, "label": i % 2 == 0}
        for i in range(2)])
    with pytest.raises(ConfigError, match="has 2048 positions; lower --max-length to 2047"):
        build_cache(tiny_dir, [data], tmp_path / "out", max_length=4000, max_prompt_length=3000)


def test_compare_reports_drift_between_dtypes(tiny_dir, tmp_path):
    data = synthetic(tmp_path, n=12)
    build_cache(tiny_dir, [data], tmp_path / "fp32")
    build_cache(tiny_dir, [data], tmp_path / "bf16", dtype="bfloat16")
    same = CliRunner().invoke(main, ["compare", str(tmp_path / "fp32"), str(tmp_path / "fp32")])
    assert json.loads(same.output)["ref_logps"]["max"] == 0.0
    drift = json.loads(CliRunner().invoke(
        main, ["compare", str(tmp_path / "bf16"), str(tmp_path / "fp32")]).output)
    assert drift["rows"] == 12 and drift["ref_logps"]["max"] > 1e-2
    assert drift["differences"] == ["reference_model.dtype: 'bfloat16' vs 'float32'"]
    other = synthetic(tmp_path, n=6, name="other.jsonl")
    build_cache(tiny_dir, [other], tmp_path / "other")
    bad = CliRunner().invoke(main, ["compare", str(tmp_path / "fp32"), str(tmp_path / "other")])
    assert bad.exit_code == 1 and "not built from the same rows" in bad.output
    assert "data.fingerprint" in bad.output


def test_compare_refuses_caches_whose_kl_pairs_differ(tiny_dir, tmp_path):
    """The same records with another --seed: the same ids, other KL partners, so a
    row-by-row comparison of ref_kl_logps would compare different sequences."""
    data = synthetic(tmp_path, n=12)
    build_cache(tiny_dir, [data], tmp_path / "a")
    build_cache(tiny_dir, [data], tmp_path / "b", seed=7)
    bad = CliRunner().invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert bad.exit_code == 1 and "preprocessing.seed: 42 vs 7" in bad.output


def test_overwrite_by_one_worker_keeps_other_workers_shards(tiny_dir, tmp_path):
    data = synthetic(tmp_path, n=20)
    out = tmp_path / "shared-dir"
    for i in range(2):
        build_cache(tiny_dir, [data], out, shard_size=5, num_workers=2, worker_index=i)
    theirs = {f.name: f.stat().st_mtime_ns for f in out.glob("shard-0000[13]-*")}
    build_cache(tiny_dir, [data], out, shard_size=5, num_workers=2, worker_index=0,
                overwrite=True)
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("shard-0000[13]-*")} == theirs
    assert CliRunner().invoke(main, ["combine", str(out)]).exit_code == 0


def test_combine_of_a_single_worker_cache_only_verifies_it(tiny_dir, tmp_path):
    data = synthetic(tmp_path, n=10)
    build_cache(tiny_dir, [data], tmp_path / "out")
    before = (tmp_path / "out" / "manifest.json").read_text()
    result = CliRunner().invoke(main, ["combine", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "manifest.json").read_text() == before
