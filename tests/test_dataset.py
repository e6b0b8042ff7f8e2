"""The public read API (shared.dataset) and the cache folder as a dataset: the dataset card
that `datasets.load_dataset(CACHE)` reads, on real caches built from the demo files."""

from __future__ import annotations

import shutil
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import build_cache
from tiny import write_jsonl

from precompute.cli import main
from shared.cache import SCHEMA, read_manifest, verify_cache
from shared.card import CARD, card_text, is_card
from shared.dataset import cache_features, load_cache_dataset, open_cache
from shared.errors import CacheError


def shards_read_plainly(cache) -> pa.Table:
    manifest = read_manifest(cache)
    return pa.concat_tables([pq.read_table(cache / s["name"]) for s in manifest["shards"]])


def load_folder(cache, tmp_path):
    """What a user of the ecosystem does: load the folder as it is (the card decides)."""
    import datasets

    return datasets.load_dataset(str(cache), split="train", cache_dir=str(tmp_path / "hf"))


def test_open_cache_holds_every_shard_memory_mapped(hf_real_caches, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cache = hf_real_caches / "dpo"  # 600 rows in 5 shards
    before = pa.total_allocated_bytes()
    opened = open_cache(cache)
    allocated = pa.total_allocated_bytes() - before
    plain = shards_read_plainly(cache)
    assert len(opened) == 600 and opened.table.equals(plain.replace_schema_metadata(None))
    assert opened.manifest == read_manifest(cache)
    # the rows live in the mapped file, not in Arrow's heap; the spill file is already
    # unlinked (the mapping keeps it readable)
    assert opened.table.nbytes > 1_000_000 and allocated < opened.table.nbytes / 100
    assert list(tmp_path.glob("kto-cache-*.arrow")) == []
    assert opened.table["ref_logps"].to_pylist() == plain["ref_logps"].to_pylist()


def test_open_cache_columns_and_unknown_column(hf_real_caches):
    cache = hf_real_caches / "kto"
    table = open_cache(cache, columns=["label", "ref_logps"]).table
    assert table.column_names == ["label", "ref_logps"] and table.num_rows == 300
    with pytest.raises(CacheError, match=r"no column\(s\) \['logps'\] in a cache"):
        open_cache(cache, columns=["logps"])


def test_readers_refuse_a_damaged_shard_by_name(hf_real_caches, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(hf_real_caches / "kto", cache)
    shard = sorted(cache.glob("shard-*.parquet"))[1]
    raw = bytearray(shard.read_bytes())
    raw[300] ^= 0xFF
    shard.write_bytes(bytes(raw))
    for read in (open_cache, load_cache_dataset):
        with pytest.raises(CacheError, match=f"shard {shard.name} is damaged"):
            read(cache)


def test_load_cache_dataset_equals_open_cache(hf_real_caches, tmp_path):
    cache = hf_real_caches / "dpo"
    ds = load_cache_dataset(cache, cache_dir=str(tmp_path / "hf"))
    assert ds.features == cache_features() and ds.split == "train"
    assert ds.data.table.equals(open_cache(cache).table)


def test_card_header_declares_the_cache_schema_and_shards(hf_real_caches):
    from datasets import Features
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    cache = hf_real_caches / "kto"
    card = DatasetCard.load(cache / CARD)
    info = DatasetInfosDict.from_dataset_card_data(card.data)["default"]
    assert info.features == cache_features() == Features.from_arrow_schema(SCHEMA)
    assert info.splits["train"].num_examples == 300
    configs = MetadataConfigs.from_dataset_card_data(card.data)
    assert configs["default"]["data_files"] == [
        {"split": "train", "path": "shard-*-of-00003.parquet"}]
    assert card.data.license == "other" and "kto" in card.data.tags


def test_load_dataset_on_the_folder_returns_exactly_the_rows(hf_real_caches, tmp_path):
    for name in ("kto", "dpo"):
        cache = hf_real_caches / name
        ds = load_folder(cache, tmp_path)
        assert ds.column_names == SCHEMA.names
        assert ds.data.table.equals(open_cache(cache).table)  # manifest.json is not data
        verify_cache(cache)  # the card changes nothing that verify checks
        result = CliRunner().invoke(main, ["verify", str(cache)])
        assert result.exit_code == 0 and "checksums match" in result.output


def test_load_dataset_checks_the_row_count(hf_real_caches, tmp_path):
    """num_examples in the card: a missing shard is an error, not fewer rows."""
    import datasets

    cache = tmp_path / "cache"
    shutil.copytree(hf_real_caches / "kto", cache)
    sorted(cache.glob("shard-*.parquet"))[-1].unlink()
    with pytest.raises(datasets.exceptions.NonMatchingSplitsSizesError):
        load_folder(cache, tmp_path)


def test_shared_folder_of_workers_loads_only_the_shards(tiny_dir, tmp_path):
    """Two workers writing into one folder leave three JSON manifests beside two shards;
    the card's data_files keep `datasets` to the shards."""
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": f"Question {i % 5}?", "completion": f"Answer {i}.", "label": i % 3 != 0}
        for i in range(20)])
    out = tmp_path / "shared"
    for i in range(2):
        build_cache(tiny_dir, [data], out, shard_size=10, num_workers=2, worker_index=i)
    assert not (out / CARD).exists()  # parts get no card: the cache is not finished
    assert CliRunner().invoke(main, ["combine", str(out)]).exit_code == 0
    assert len(list(out.glob("manifest*.json"))) == 3 and is_card(out / CARD)
    assert (out / CARD).read_text() == card_text(read_manifest(out))
    assert load_folder(out, tmp_path).data.table.equals(open_cache(out).table)


def test_card_is_deterministic_and_follows_reruns_and_overwrite(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": f"Question {i % 5}?", "completion": f"Answer {i}.", "label": i % 3 != 0}
        for i in range(20)])
    out = tmp_path / "out"
    build_cache(tiny_dir, [data], out, shard_size=10)
    first = (out / CARD).read_bytes()
    assert first.decode() == card_text(read_manifest(out))
    build_cache(tiny_dir, [data], out, shard_size=10)  # a rerun (reuses the shards)
    assert (out / CARD).read_bytes() == first
    build_cache(tiny_dir, [data], out, shard_size=10, seed=7, overwrite=True)
    card = (out / CARD).read_text()
    assert card == card_text(read_manifest(out)) and "`seed=7`" in card
    assert read_manifest(out)["cache_key"] in card and card.encode() != first


def test_a_readme_that_is_not_a_card_is_left_alone(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 2 == 0}
        for i in range(6)])
    out = tmp_path / "project"
    out.mkdir()
    (out / CARD).write_text("# My project\n")
    build_cache(tiny_dir, [data], out)
    build_cache(tiny_dir, [data], out, seed=3, overwrite=True)
    assert (out / CARD).read_text() == "# My project\n"


def test_combine_adds_a_card_to_a_cache_from_before_cards(hf_real_caches, tmp_path):
    cache = tmp_path / "old"
    shutil.copytree(hf_real_caches / "kto", cache)
    (cache / CARD).unlink()
    result = CliRunner().invoke(main, ["combine", str(cache)])
    assert result.exit_code == 0, result.output
    assert (cache / CARD).read_text() == card_text(read_manifest(cache))
    assert load_folder(cache, tmp_path).num_rows == 300
