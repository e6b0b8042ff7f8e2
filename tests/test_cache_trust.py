"""No kto-precompute command damages a finished cache or writes through a link planted in
its folder; `verify` recomputes what a manifest could only claim."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import build_cache
from reliability_helpers import PRECIOUS, assert_clean_error, edit_json, planted_output
from test_precompute import synthetic

from precompute.cli import main
from shared.cache import verify_cache


@pytest.fixture(scope="module")
def caches(tiny_dir, tmp_path_factory):
    """A finished cache and the two worker parts of another dataset's cache."""
    root = tmp_path_factory.mktemp("cache-trust")
    data, other = synthetic(root, n=20), synthetic(root, n=12, name="other.jsonl")
    build_cache(tiny_dir, [data], root / "finished", shard_size=8)
    for i in range(2):
        build_cache(tiny_dir, [other], root / "parts" / f"w{i}", shard_size=8, num_workers=2,
                    worker_index=i)
        build_cache(tiny_dir, [data], root / "same" / f"w{i}", shard_size=8, num_workers=2,
                    worker_index=i)
    return {"root": root, "data": data, "finished": root / "finished"}


def everything(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def parts_of(root: Path) -> list[str]:
    return [a for i in range(2) for a in ("--part", str(root / f"w{i}"))]


def test_combine_refuses_to_replace_a_finished_cache_of_other_data(caches, tmp_path):
    out = shutil.copytree(caches["finished"], tmp_path / "out")
    before = everything(out)
    result = CliRunner().invoke(main, ["combine", str(out), *parts_of(caches["root"] / "parts")])
    assert_clean_error(result, "already holds a finished cache", "--overwrite")
    assert everything(out) == before


def test_combine_overwrite_replaces_it_whole(caches, tmp_path):
    out = shutil.copytree(caches["finished"], tmp_path / "out")
    result = CliRunner().invoke(main, ["combine", str(out), "--overwrite",
                                       *parts_of(caches["root"] / "parts")])
    assert result.exit_code == 0, result.output
    manifest = verify_cache(out)
    assert sorted(p.name for p in out.glob("shard-*")) == sorted(
        s["name"] for s in manifest["shards"])  # none of the old cache's shards stays
    assert manifest["counts"]["rows"] == 12


def test_combine_of_the_same_parts_again_is_accepted(caches, tmp_path):
    out = tmp_path / "out"
    for _ in range(2):
        result = CliRunner().invoke(main, ["combine", str(out),
                                           *parts_of(caches["root"] / "same")])
        assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["cache_key"] == json.loads(
        (caches["finished"] / "manifest.json").read_text())["cache_key"]


def test_a_failed_combine_keeps_the_good_manifest(caches, tmp_path):
    """Stale worker manifests (of the same settings) beside a finished cache, one of them
    wrong: the combine fails, and the finished cache's manifest.json stays."""
    out = shutil.copytree(caches["finished"], tmp_path / "out")
    for i in range(2):
        name = f"manifest.worker-{i:05d}-of-00002.json"
        shutil.copy(caches["root"] / "same" / f"w{i}" / name, out / name)
    edit_json(out / "manifest.worker-00000-of-00002.json",
              lambda m: m["shards"][0].update(sha256="0" * 64))
    good = (out / "manifest.json").read_bytes()
    result = CliRunner().invoke(main, ["combine", str(out)])
    assert result.exit_code == 1, result.output
    assert (out / "manifest.json").read_bytes() == good
    verify_cache(out)


@pytest.mark.parametrize("name", [".kto-precompute-worker-00000.lock", "manifest.json",
                                  "shard-00000-of-00003.parquet"])
def test_a_link_planted_in_the_output_is_refused_and_its_target_intact(tiny_dir, caches,
                                                                       tmp_path, name):
    out, victim = planted_output(tmp_path, name)
    result = CliRunner().invoke(main, ["--model", str(tiny_dir), "--data", str(caches["data"]),
                                       "--output", str(out), "--backend", "hf"])
    assert_clean_error(result, "symbolic link", name)
    assert victim.read_text() == PRECIOUS


def test_an_output_inside_a_data_folder_is_refused(tiny_dir, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    synthetic(folder, n=8)
    result = CliRunner().invoke(main, ["--model", str(tiny_dir), "--data", str(folder),
                                       "--output", str(folder / "cache"), "--backend", "hf"])
    assert_clean_error(result, "is inside --data")
    assert not (folder / "cache").exists()


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m["preprocessing"].update(seed=7), "not the hash of its identity fields"),
    (lambda m: m["reference_model"].update(dtype="bfloat16"), "not the hash of its identity"),
    (lambda m: m["counts"].update(invalid=3), "invalid: shards hold 0, manifest says 3"),
])
def test_verify_recomputes_what_the_manifest_claims(caches, tmp_path, edit, fragment):
    cache = shutil.copytree(caches["finished"], tmp_path / "cache")
    edit_json(cache / "manifest.json", edit)
    assert_clean_error(CliRunner().invoke(main, ["verify", str(cache)]), fragment)


@pytest.mark.parametrize("option", ["--cpu-kv-cache-gib", "--gpu-memory-utilization"])
def test_non_finite_float_options_are_refused(tiny_dir, caches, tmp_path, option):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--model", str(tiny_dir), "--data", str(caches["data"]),
                                       "--output", str(out), option, "nan"])
    assert_clean_error(result, option, "finite")
    assert not out.exists()


def test_a_failed_combine_overwrite_keeps_the_finished_cache(caches, tmp_path):
    """--overwrite removed the finished cache, then found a part's shard missing."""
    out = shutil.copytree(caches["finished"], tmp_path / "out")
    for i in range(2):
        name = f"manifest.worker-{i:05d}-of-00002.json"
        shutil.copy(caches["root"] / "parts" / f"w{i}" / name, out / name)  # shards elsewhere
    before = everything(out)
    result = CliRunner().invoke(main, ["combine", str(out), "--overwrite"])
    assert_clean_error(result, "is missing from")
    assert everything(out) == before


@pytest.mark.parametrize("name", ["shard-00000-of-00003.parquet",
                                  ".shard-00000-of-00003.parquet.tmp-1"])
def test_combine_refuses_a_link_planted_in_its_output(caches, tmp_path, name):
    out, victim = planted_output(tmp_path, name)
    result = CliRunner().invoke(main, ["combine", str(out), *parts_of(caches["root"] / "same")])
    assert_clean_error(result, "symbolic link", name)
    assert victim.read_text() == PRECIOUS


def test_a_hard_link_at_the_worker_lock_is_refused(tiny_dir, caches, tmp_path):
    out, victim = planted_output(tmp_path, ".kto-precompute-worker-00000.lock", hard=True)
    result = CliRunner().invoke(main, ["--model", str(tiny_dir), "--data", str(caches["data"]),
                                       "--output", str(out), "--backend", "hf"])
    assert_clean_error(result, "hard links")
    assert victim.read_text() == PRECIOUS


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m["counts"].update(records=99), "records: shards hold 20, manifest says 99"),
    (lambda m: m["data"]["files"][0].update(records=99),
     "records (data.files): shards hold 99, manifest says 20"),
    (lambda m: (m["shards"][0].update(tokens=m["shards"][0]["tokens"] + 10),
                m["shards"][1].update(tokens=m["shards"][1]["tokens"] - 10)),
     "tokens, manifest says"),
    (lambda m: m["backend"].update(name="vllm"), "backend.name 'vllm'"),
])
def test_verify_recomputes_counts_and_tokens(caches, tmp_path, edit, fragment):
    cache = shutil.copytree(caches["finished"], tmp_path / "cache")
    edit_json(cache / "manifest.json", edit)
    assert_clean_error(CliRunner().invoke(main, ["verify", str(cache)]), fragment)


def test_a_deeply_nested_manifest_is_one_line(caches, tmp_path):
    cache = shutil.copytree(caches["finished"], tmp_path / "cache")
    (cache / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_clean_error(CliRunner().invoke(main, ["verify", str(cache)]), "nested too deeply")
