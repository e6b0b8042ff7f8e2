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
from shared.cache import MANIFEST, check_cache_files, verify_cache, write_json
from shared.card import CARD, is_card, write_card
from shared.errors import CacheError, StorageError
from shared.files import open_new, refuse_link, refuse_links_in
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


def check_part_shards(parts: list[tuple[Path, dict[str, Any]]]) -> None:
    """Every shard the parts list is present and matches its SHA-256, so that a combine that
    replaces a finished cache (--overwrite) cannot fail halfway for want of a shard."""
    for src_dir, manifest in parts:
        worker = manifest["worker"]["index"]
        for entry in manifest["shards"]:
            src = src_dir / entry["name"]
            refuse_link(src, "a shard of a worker part")
            if not src.is_file():
                raise CacheError(f"shard {entry['name']} of worker {worker} is missing from "
                                 f"{src_dir}; re-run that worker (--worker-index {worker})")
            if sha256_file(src) != entry["sha256"]:
                raise CacheError(f"shard {src} is damaged: its SHA-256 does not match its "
                                 f"worker manifest; re-run worker {worker} (--worker-index "
                                 f"{worker}) with the same options on its --output to rebuild it")


def _bring_shard(src_dir: Path, out: Path, entry: dict[str, Any], worker: int) -> None:
    src, dst = src_dir / entry["name"], out / entry["name"]
    if src.resolve() == dst.resolve():
        return  # checked by verify_cache at the end
    if dst.is_file() and sha256_file(dst) == entry["sha256"]:
        return
    tmp = out / f".{entry['name']}.tmp-{os.getpid()}"
    try:
        with open(src, "rb") as source, open_new(tmp) as target:  # never through a link
            shutil.copyfileobj(source, target, 1 << 20)
        if sha256_file(tmp) != entry["sha256"]:
            raise CacheError(f"shard {src} is damaged: its SHA-256 does not match its worker "
                             f"manifest; re-run worker {worker} (--worker-index {worker}) "
                             "with the same options on its --output to rebuild it")
        os.replace(tmp, dst)
    except OSError as err:
        raise StorageError(dst, err, where="OUTPUT") from None
    finally:
        tmp.unlink(missing_ok=True)


def combine(out: Path, part_dirs: list[Path], overwrite: bool = False) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    refuse_links_in(out, "the cache")
    single = not list(out.glob("manifest.worker-*.json")) and (out / MANIFEST).is_file()
    if not part_dirs and single:  # a single-worker run is already one cache
        manifest = verify_cache(out)
        write_card(out, manifest)  # (caches from before cards existed get one here)
        return manifest
    parts = find_parts(part_dirs or [out])
    check_parts(parts)
    check_part_shards(parts)  # all present and intact before anything in OUTPUT changes
    claim_output(out, parts, overwrite)
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
    check_cache_files(out, merged)  # the manifest is written only over shards that pass
    write_json(out / MANIFEST, merged)
    write_card(out, merged)
    log.info("combined %d worker parts into %s", len(parts), out)
    return merged


def claim_output(out: Path, parts: list[tuple[Path, dict[str, Any]]], overwrite: bool) -> None:
    """OUTPUT may hold a finished cache only of these same parts (a combine run again);
    another cache there is refused, as kto-precompute refuses one, unless --overwrite,
    which removes that cache's manifest, card and shards first."""
    finished = out / MANIFEST
    if not finished.is_file():
        return
    key = parts[0][1]["cache_key"]
    try:
        existing = check_manifest(load_json_object(finished), finished)
    except CacheError as err:
        if not overwrite:
            raise CacheError(f"{err}; or pass --overwrite to replace the cache in {out}"
                             ) from None
        existing = None
    if existing is not None and existing["cache_key"] == key:
        return
    if not overwrite:
        raise CacheError(f"{out} already holds a finished cache made with other settings or "
                         f"data (cache key {existing['cache_key'][:12]}, the parts' "
                         f"{key[:12]}); choose another OUTPUT or pass --overwrite to replace it")
    keep = {e["name"] for d, m in parts if d.resolve() == out.resolve() for e in m["shards"]}
    for name in [e["name"] for e in (existing or {}).get("shards", [])]:
        if name not in keep:
            (out / name).unlink(missing_ok=True)
    finished.unlink()
    card = out / CARD
    if is_card(card):
        card.unlink()
    log.info("--overwrite: removed the finished cache that was in %s", out)
