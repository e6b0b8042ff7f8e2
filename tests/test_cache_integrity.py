"""Damaged or foreign cache data is rebuilt or refused, never blessed; no name read from a
manifest leads outside the cache folder; manifests that are not what they claim give one
clean line."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner
from conftest import build_cache
from reliability_helpers import assert_clean_error, edit_json, flip_bit_in_column, strict_loads
from test_precompute import synthetic

from precompute.cli import main
from shared.cache import verify_cache
from shared.errors import CacheError

SHARD1 = "shard-00001-of-00003.parquet"


@pytest.fixture(scope="module")
def clean(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    data = synthetic(root, n=20)
    build_cache(tiny_dir, [data], root / "clean", shard_size=8)
    return {"root": root, "data": data, "cache": root / "clean"}


def copy_cache(clean, tmp_path, name="cache"):
    return shutil.copytree(clean["cache"], tmp_path / name)


def rerun(tiny_dir, clean, cache):
    return build_cache(tiny_dir, [clean["data"]], cache, shard_size=8)


@pytest.mark.parametrize("column", ["ref_logps", "prompt_ids"])
def test_rerun_rebuilds_a_shard_with_bit_rot(tiny_dir, clean, tmp_path, column):
    """Item 3: verify names the damage; the rerun it advises rebuilds that shard
    byte-identical instead of writing the damaged file's SHA-256 into the manifest."""
    cache = copy_cache(clean, tmp_path)
    flip_bit_in_column(cache / SHARD1, column)
    assert_clean_error(CliRunner().invoke(main, ["verify", str(cache)]),
                       f"shard {SHARD1} is damaged", "re-run kto-precompute")
    summary = rerun(tiny_dir, clean, cache)
    assert summary["rows_scored_now"] == 8  # shard 1 only
    assert (cache / SHARD1).read_bytes() == (clean["cache"] / SHARD1).read_bytes()
    assert CliRunner().invoke(main, ["verify", str(cache)]).exit_code == 0


def test_rerun_without_manifest_finds_bit_rot_by_page_checksums(tiny_dir, clean, tmp_path):
    """A run killed before its manifest was written: no SHA-256 to compare, yet a flipped
    bit in a reference value is found (every page carries a CRC) and the shard rebuilt."""
    cache = copy_cache(clean, tmp_path)
    (cache / "manifest.json").unlink()
    flip_bit_in_column(cache / SHARD1, "ref_logps")
    assert rerun(tiny_dir, clean, cache)["rows_scored_now"] == 8
    assert (cache / SHARD1).read_bytes() == (clean["cache"] / SHARD1).read_bytes()


def test_rerun_rebuilds_a_shard_holding_a_nan(tiny_dir, clean, tmp_path):
    """A shard rewritten with one NaN reference value and its SHA-256 refreshed in the
    manifest (item 2's cache): verify refuses it, a rerun rebuilds it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shared.fingerprint import sha256_file

    cache = copy_cache(clean, tmp_path)
    table = pq.read_table(cache / SHARD1)
    values = table["ref_logps"].to_pylist()
    values[3] = float("nan")
    table = table.set_column(table.schema.get_field_index("ref_logps"), "ref_logps",
                             pa.array(values, type=pa.float64()))
    pq.write_table(table, cache / SHARD1, compression="zstd")
    edit_json(cache / "manifest.json", lambda m: m["shards"][1].update(
        sha256=sha256_file(cache / SHARD1)))
    with pytest.raises(CacheError, match=f"shard {SHARD1} holds non-finite reference"):
        verify_cache(cache)
    assert rerun(tiny_dir, clean, cache)["rows_scored_now"] == 8
    verify_cache(cache)


def test_verify_refuses_a_name_outside_the_cache_folder(clean, tmp_path):
    """Item 4: a manifest naming ../other/shard-... is refused even when that file exists
    and its SHA-256 matches."""
    cache = copy_cache(clean, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(cache / SHARD1, other / SHARD1)
    edit_json(cache / "manifest.json",
              lambda m: m["shards"][1].update(name=f"../other/{SHARD1}"))
    assert_clean_error(CliRunner().invoke(main, ["verify", str(cache)]),
                       "field 'shards[1].name'", "../other/", "a shard file of this cache")


def test_verify_refuses_a_shard_of_another_cache(tiny_dir, clean, tmp_path):
    """Item 4: a shard copied in from another cache, SHA-256 updated in the manifest."""
    from shared.fingerprint import sha256_file

    cache = copy_cache(clean, tmp_path)
    build_cache(tiny_dir, [clean["data"]], tmp_path / "seed7", shard_size=8, seed=7)
    shutil.copy(tmp_path / "seed7" / SHARD1, cache / SHARD1)
    edit_json(cache / "manifest.json", lambda m: m["shards"][1].update(
        sha256=sha256_file(cache / SHARD1)))
    assert_clean_error(CliRunner().invoke(main, ["verify", str(cache)]),
                       f"shard {SHARD1} belongs to another cache")


@pytest.mark.parametrize("edit,fragment", [
    (lambda m: m["counts"].update(desirable=m["counts"]["desirable"] + 1,
                                  undesirable=m["counts"]["undesirable"] - 1),
     "desirable: shards hold 13, manifest says 14"),
    (lambda m: m["shards"][1].update(rows=9), f"shard {SHARD1} holds 8 rows, manifest says 9"),
    (lambda m: m.update(tokens=m["tokens"] + 5), "tokens: shards hold"),
])
def test_verify_checks_row_and_label_counts(clean, tmp_path, edit, fragment):
    cache = copy_cache(clean, tmp_path)
    edit_json(cache / "manifest.json", edit)
    assert_clean_error(CliRunner().invoke(main, ["verify", str(cache)]), fragment)


@pytest.mark.parametrize("content,fragment", [
    ("[]", "expected a JSON object, got list"),
    ('{"format_version": 1}', "field 'cache_key' is missing"),
    ("{not json", "is not a valid manifest (not JSON"),
    ("", "is not a valid manifest (not JSON"),
])
def test_verify_and_rerun_explain_a_broken_manifest(tiny_dir, clean, tmp_path, content,
                                                    fragment):
    """Item 12: verify, and precompute's check of its --output, in one line each."""
    cache = copy_cache(clean, tmp_path)
    (cache / "manifest.json").write_text(content)
    assert_clean_error(CliRunner().invoke(main, ["verify", str(cache)]), fragment)
    result = CliRunner().invoke(main, ["--model", str(tiny_dir), "--data", str(clean["data"]),
                                       "--output", str(cache), "--backend", "hf",
                                       "--shard-size", "8"])
    assert_clean_error(result, fragment, "pass --overwrite")


@pytest.mark.parametrize("edit,fragment", [
    (lambda m: m.pop("shards"), "field 'shards' is missing"),
    (lambda m: m["data"]["files"][0].pop("records"), "field 'data.files[0].records' is missing"),
    (lambda m: m["counts"].update(rows="20"), "field 'counts.rows' is '20'"),
])
def test_verify_refuses_a_manifest_with_a_missing_or_wrong_field(clean, tmp_path, edit,
                                                                 fragment):
    cache = copy_cache(clean, tmp_path)
    edit_json(cache / "manifest.json", edit)
    assert_clean_error(CliRunner().invoke(main, ["verify", str(cache)]), fragment)


@pytest.fixture()
def parts(tiny_dir, clean, tmp_path):
    root = tmp_path / "a" / "b"
    for i in range(2):
        build_cache(tiny_dir, [clean["data"]], root / f"w{i}", shard_size=8, num_workers=2,
                    worker_index=i)
    return root


def part_args(root):
    return [a for i in range(2) for a in ("--part", str(root / f"w{i}"))]


def test_combine_refuses_a_shard_name_that_leaves_the_folder(parts, tmp_path):
    """Item 8: `./../../evil.parquet` in a part manifest must not be written anywhere."""
    part = parts / "w0" / "manifest.worker-00000-of-00002.json"
    name = "./../../evil.parquet"
    shutil.copy(parts / "w0" / "shard-00000-of-00003.parquet", parts / "w0" / name)
    edit_json(part, lambda m: m["shards"][0].update(name=name))
    out = tmp_path / "x" / "y" / "out"
    result = CliRunner().invoke(main, ["combine", str(out), *part_args(parts)])
    assert_clean_error(result, f"{part}: field 'shards[0].name'", "a shard file of this cache")
    assert not (out / name).resolve().exists()
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("content,fragment", [
    ("[]", "not a valid worker manifest: expected a JSON object"),
    ("{oops", "not a valid worker manifest (not JSON"),
])
def test_combine_explains_a_broken_worker_manifest(parts, content, fragment):
    """Item 12, combine's worker manifests."""
    (parts / "w1" / "manifest.worker-00001-of-00002.json").write_text(content)
    result = CliRunner().invoke(main, ["combine", str(parts / "out"), *part_args(parts)])
    assert_clean_error(result, fragment)


def test_combine_refuses_a_damaged_part_shard(parts):
    """A worker's shard damaged after it finished: combine names it and the worker to rerun,
    and leaves no manifest over it."""
    flip_bit_in_column(parts / "w1" / "shard-00001-of-00003.parquet", "ref_logps")
    result = CliRunner().invoke(main, ["combine", str(parts / "out"), *part_args(parts)])
    assert_clean_error(result, "shard-00001-of-00003.parquet is damaged",
                       "re-run worker 1 (--worker-index 1)")
    assert not (parts / "out" / "manifest.json").exists()


def test_rerun_summary_is_strict_json_when_nothing_is_scored(tiny_dir, clean, tmp_path):
    """Every shard reused: the rates are null, not NaN (which is not JSON)."""
    cache = copy_cache(clean, tmp_path)
    result = CliRunner().invoke(main, ["--model", str(tiny_dir), "--data", str(clean["data"]),
                                       "--output", str(cache), "--backend", "hf",
                                       "--shard-size", "8"])
    assert result.exit_code == 0, result.output
    summary = strict_loads(result.stdout)
    assert summary["rows_scored_now"] == 0 and summary["rows_per_second"] is None
