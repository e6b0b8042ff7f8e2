"""Combine the parts written by N workers into one cache: check that every worker
finished with the same settings, bring their shards into one directory, and
write the single manifest. Every name comes from a checked manifest (a shard name of
this cache, nothing else), every copied shard is checked against its SHA-256 before it
is renamed into place, and nothing is written outside OUTPUT."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from shared import CACHE_FORMAT_VERSION
from shared.cache import MANIFEST, verify_cache, write_json
from shared.card import write_card
from shared.errors import CacheError, StorageError
from shared.fingerprint import sha256_file
from shared.manifest import REWRITE, check_manifest, load_json_object

log = logging.getLogger(__name__)


def read_part(path: Path) -> dict[str, Any]:
    manifest = load_json_object(path, "worker manifest")
    if manifest.get("format_version") != CACHE_FORMAT_VERSION:
        raise CacheError(f"{path}: format_version {manifest.get('format_version')!r}, this "
                         f"version reads {CACHE_FORMAT_VERSION}; {REWRITE}")
    if not isinstance(manifest.get("worker"), dict):
        raise CacheError(f"{path}: field 'worker' is missing; not a worker manifest: {REWRITE}")
    return check_manifest(manifest, path)


def find_parts(dirs: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    parts = []
    for d in dirs:
        for f in sorted(d.glob("manifest.worker-*-of-*.json")):
            parts.append((d, read_part(f)))
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


def _bring_shard(src_dir: Path, out: Path, entry: dict[str, Any], worker: int) -> None:
    src, dst = src_dir / entry["name"], out / entry["name"]
    if src.resolve() == dst.resolve():
        return  # checked by verify_cache at the end
    if dst.is_file() and sha256_file(dst) == entry["sha256"]:
        return
    if not src.is_file():
        raise CacheError(f"shard {entry['name']} of worker {worker} is missing from {src_dir}; "
                         f"re-run that worker (--worker-index {worker})")
    tmp = out / f".{entry['name']}.tmp-{os.getpid()}"
    try:
        shutil.copyfile(src, tmp)
        if sha256_file(tmp) != entry["sha256"]:
            raise CacheError(f"shard {src} is damaged: its SHA-256 does not match its worker "
                             f"manifest; re-run worker {worker} (--worker-index {worker}) "
                             "with the same options on its --output to rebuild it")
        os.replace(tmp, dst)
    except OSError as err:
        raise StorageError(dst, err, where="OUTPUT") from None
    finally:
        tmp.unlink(missing_ok=True)


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
            _bring_shard(src_dir, out, entry, manifest["worker"]["index"])
            shards.append(entry)
    merged = {k: v for k, v in parts[0][1].items() if k != "worker"}
    merged["shards"] = sorted(shards, key=lambda e: e["name"])
    merged["tokens"] = sum(e["tokens"] for e in shards)
    if len(merged["shards"]) != merged["num_shards"]:
        raise CacheError(f"the parts hold {len(shards)} shards, the cache has "
                         f"{merged['num_shards']}")
    write_json(out / MANIFEST, merged)
    try:
        verify_cache(out)
    except CacheError:
        (out / MANIFEST).unlink()  # never leave a manifest over shards that failed
        raise
    write_card(out, merged)
    log.info("combined %d worker parts into %s", len(parts), out)
    return merged
