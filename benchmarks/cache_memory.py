"""Peak memory of the ways to read a whole cache. Each way runs in its own process, which
imports the libraries, opens the cache and reads every value once (a full pass over all
columns). From /proc/self/status: the resident set once the libraries are imported, the
peak resident set (VmHWM) after opening and after the pass, and at the end the resident set
split into anonymous (heap) and file-backed pages (mapped file pages, which the kernel may
drop and read again). Memory only, no timing.

    python benchmarks/cache_memory.py runs/bench/scaling/cache-100000
    python benchmarks/cache_memory.py runs/bench/scaling/cache-100000 --inflate 40
    python benchmarks/cache_memory.py runs/bench/scaling/cache-100000 --inflate 40 --one-shard

Ways: in-memory (every shard read with pyarrow into RAM, as tests/conftest did), spill-shard
(kto-train before shared.dataset: each whole shard read, then appended to an Arrow file in
$TMPDIR that is memory-mapped), open_cache (shared.dataset: the same spill, batch by batch),
datasets (load_cache_dataset: datasets' Arrow cache, memory-mapped; the first call converts
the shards, a second process reuses the conversion).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

WAYS = ("in-memory", "spill-shard", "open_cache", "datasets-first", "datasets-again")


def status() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 2**20  # kB -> GiB
    return fields


def open_way(way: str, cache: Path, work: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shared.cache import verify_cache

    if way == "in-memory":
        manifest = verify_cache(cache)
        return pa.concat_tables([pq.read_table(cache / s["name"]) for s in manifest["shards"]])
    if way == "spill-shard":  # train/data.py's open_cache before shared.dataset
        manifest = verify_cache(cache)
        with pa.OSFile(str(work / "train.arrow"), "wb") as sink:
            writer = None
            for shard in manifest["shards"]:
                table = pq.read_table(cache / shard["name"])
                writer = writer or pa.ipc.new_file(sink, table.schema)
                writer.write_table(table)
            writer.close()
        return pa.ipc.open_file(pa.memory_map(str(work / "train.arrow"))).read_all()
    if way == "open_cache":
        from shared.dataset import open_cache

        return open_cache(cache).table
    from shared.dataset import load_cache_dataset

    return load_cache_dataset(cache, cache_dir=str(work / "hf")).data.table


def full_pass(table) -> float:
    """Read every value once: sum every numeric column and every list's values."""
    import pyarrow.compute as pc

    total = 0.0
    for name in table.column_names:
        column = table[name]
        if str(column.type).startswith("list"):
            column = pc.list_flatten(column)
        if str(column.type) in ("string", "bool"):
            total += pc.sum(pc.utf8_length(column) if str(column.type) == "string"
                            else pc.cast(column, "int64")).as_py() or 0
        else:
            total += pc.sum(column).as_py() or 0
    return total


def child(way: str, cache: Path, work: Path) -> None:
    import datasets  # noqa: F401  (every way imports the same libraries before the start)
    import pyarrow.compute  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    import shared.dataset  # noqa: F401

    base = status()
    table = open_way(way, cache, work)
    opened = status()
    full_pass(table)
    end = status()
    print(json.dumps({"way": way, "rows": table.num_rows, "start_gib": base["VmRSS"],
                      "peak_after_open_gib": opened["VmHWM"], "peak_gib": end["VmHWM"],
                      "anon_gib": end["RssAnon"], "file_gib": end["RssFile"]}))


def repeat_lists(column, times: int):
    """Every list of a list<int32> column repeated ``times`` times, end to end."""
    import numpy as np
    import pyarrow as pa

    column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy()
    lengths = np.diff(offsets)
    new_lengths = lengths * times
    new_offsets = np.concatenate([[0], np.cumsum(new_lengths)]).astype(np.int32)
    within = np.arange(new_offsets[-1]) - np.repeat(new_offsets[:-1], new_lengths)
    index = np.repeat(offsets[:-1], new_lengths) + within % np.repeat(lengths, new_lengths)
    return pa.ListArray.from_arrays(pa.array(new_offsets), pa.array(values[index]))


def inflate(cache: Path, out: Path, times: int, one_shard: bool) -> Path:
    """A copy of ``cache`` whose token lists are ``times`` as long (same rows, new
    checksums), optionally as a single shard: a cache large in bytes without scoring one.
    Reference values and KL partners are kept as they are, so it is for measuring readers
    only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shared.cache import read_manifest, shard_name, write_json, write_shard

    manifest = read_manifest(cache)
    out.mkdir(parents=True, exist_ok=True)
    tables = []
    for shard in manifest["shards"]:
        table = pq.read_table(cache / shard["name"])
        for name in ("prompt_ids", "completion_ids", "kl_completion_ids"):
            table = table.set_column(table.schema.get_field_index(name), name,
                                     repeat_lists(table[name], times))
        tables.append((shard["name"], table))
    if one_shard:
        tables = [(shard_name(0, 1), pa.concat_tables(t for _, t in tables))]
    infos = [write_shard(out, name, table, manifest["cache_key"]) for name, table in tables]
    shards = [{"name": i.name, "rows": i.rows, "tokens": i.tokens, "sha256": i.sha256}
              for i in infos]
    write_json(out / "manifest.json", {**manifest, "shards": shards, "num_shards": len(shards),
                                       "tokens": sum(i.tokens for i in infos)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cache", type=Path)
    ap.add_argument("--inflate", type=int, default=1,
                    help="measure a copy whose token lists are N times as long")
    ap.add_argument("--one-shard", action="store_true",
                    help="with --inflate: the copy as one shard")
    ap.add_argument("--inflated", type=Path, default=None,
                    help="where to write that copy (default: CACHE-xN[-1shard] beside CACHE)")
    ap.add_argument("--way", choices=WAYS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.way:
        return child(args.way, args.cache, args.work)
    if args.inflate > 1:
        name = f"{args.cache.name}-x{args.inflate}" + ("-1shard" if args.one_shard else "")
        target = args.inflated or args.cache.with_name(name)
        if not (target / "manifest.json").is_file():
            inflate(args.cache, target, args.inflate, args.one_shard)
        args.cache = target
    from shared.dataset import open_cache

    size = open_cache(args.cache, verify=False).table.nbytes / 2**30
    print(f"{args.cache}: {size:.2f} GiB of Arrow data")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cache-memory-") as work:
        for way in WAYS:  # datasets-again finds the Arrow cache datasets-first made
            cmd = [sys.executable, __file__, str(args.cache), "--way", way, "--work", work]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| way | rows | RSS at start | peak after open | peak after a full pass "
          "| at end: anonymous | at end: file-backed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['way']} | {r['rows']:,} | {r['start_gib']:.2f} | "
              f"{r['peak_after_open_gib']:.2f} | {r['peak_gib']:.2f} | {r['anon_gib']:.2f} | "
              f"{r['file_gib']:.2f} |")


if __name__ == "__main__":
    main()
