"""Combine the parts written by N workers into one cache: check that every worker
finished with the same settings, bring their shards into one directory, and
write the single manifest."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from shared.cache import MANIFEST, verify_cache, write_json
from shared.card import write_card
from shared.errors import CacheError
from shared.fingerprint import sha256_file

log = logging.getLogger(__name__)


def find_parts(dirs: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    parts = []
    for d in dirs:
        for f in sorted(d.glob("manifest.worker-*-of-*.json")):
            parts.append((d, json.loads(f.read_text())))
    if not parts:
        where = ", ".join(map(str, dirs))
        raise CacheError(f"no worker manifests (manifest.worker-*.json) in {where}")
    return parts


def check_parts(parts: list[tuple[Path, dict[str, Any]]]) -> int:
    """Same cache key everywhere and exactly one part per worker index."""
    keys = {m["cache_key"] for _, m in parts}
    if len(keys) != 1:
        raise CacheError("the worker parts were made with different settings (cache keys "
                         f"differ: {sorted(keys)}); rerun the odd ones with the same options")
    workers = {m["worker"]["num_workers"] for _, m in parts}
    if len(workers) != 1:
        raise CacheError(f"the parts disagree on --num-workers: {sorted(workers)}")
    n = workers.pop()
    seen = sorted(m["worker"]["index"] for _, m in parts)
    if seen != list(range(n)):
        missing = sorted(set(range(n)) - set(seen))
        raise CacheError(f"worker parts missing or repeated: have {seen}, need 0..{n - 1}"
                         + (f" (missing {missing}: run those workers first)" if missing else ""))
    return n


def _bring_shard(src_dir: Path, out: Path, entry: dict[str, Any]) -> None:
    src, dst = src_dir / entry["name"], out / entry["name"]
    if src.resolve() == dst.resolve():
        return
    if dst.is_file() and sha256_file(dst) == entry["sha256"]:
        return
    tmp = out / f".{entry['name']}.tmp-{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def combine(out: Path, part_dirs: list[Path]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    single = not list(out.glob("manifest.worker-*.json")) and (out / MANIFEST).is_file()
    if not part_dirs and single:  # a single-worker run is already one cache
        manifest = verify_cache(out)
        write_card(out, manifest)  # (caches from before cards existed get one here)
        return manifest
    parts = find_parts(part_dirs or [out])
    check_parts(parts)
    shards = []
    for src_dir, manifest in parts:
        for entry in manifest["shards"]:
            _bring_shard(src_dir, out, entry)
            shards.append(entry)
    merged = {k: v for k, v in parts[0][1].items() if k != "worker"}
    merged["shards"] = sorted(shards, key=lambda e: e["name"])
    merged["tokens"] = sum(e["tokens"] for e in shards)
    if len(merged["shards"]) != merged["num_shards"]:
        raise CacheError(f"the parts hold {len(shards)} shards, the cache has "
                         f"{merged['num_shards']}")
    write_json(out / MANIFEST, merged)
    verify_cache(out)
    write_card(out, merged)
    log.info("combined %d worker parts into %s", len(parts), out)
    return merged
