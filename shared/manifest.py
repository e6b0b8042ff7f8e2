"""The manifest's structure, checked before anything trusts it: a manifest that is not
JSON, not an object, lacks a field or names a file outside the cache folder is refused
with one line naming the file and the field. Shard names are the only file names a
manifest gives, and the only ones accepted are ``shard_name(i, num_shards)``: no path
separator, no ``..``, so no command can be led outside the cache folder."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from shared.errors import CacheError
from shared.fingerprint import sha256_json

_SHARD_NAME = re.compile(r"^shard-(\d+)-of-(\d+)\.parquet$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
REWRITE = "re-run kto-precompute (or `kto-precompute combine`) to rewrite it"
# field -> type, for the fields the tools read (dots descend into objects)
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format_version": int, "cache_key": str, "num_shards": int, "tokens": int, "shards": list,
    "reference_model": dict, "reference_model.path": str, "reference_model.dtype": str,
    "reference_model.fingerprint": str,
    "tokenizer": dict, "tokenizer.fingerprint": str,
    "backend": dict, "backend.name": str, "backend.versions": dict,
    "preprocessing": dict, "preprocessing.max_length": int,
    "preprocessing.max_prompt_length": int, "preprocessing.truncation_mode": str,
    "preprocessing.seed": int,
    "data": dict, "data.files": list,
    "counts": dict, "counts.records": int, "counts.rows": int, "counts.desirable": int,
    "counts.undesirable": int, "counts.invalid": int, "counts.invalid_by_reason": dict,
}
_SHARD_FIELDS = {"name": str, "rows": int, "tokens": int, "sha256": str}
_FILE_FIELDS = {"path": str, "records": int, "format": str}


# the fields whose hash is the cache key (precompute.identity.cache_identity)
IDENTITY_FIELDS = ("reference_model", "tokenizer", "preprocessing")


def cache_key_of(manifest: dict[str, Any]) -> str:
    """The cache key a manifest's identity fields hash to (``data.files`` is a listing
    added after hashing; the rest of ``data`` is hashed)."""
    identity = {k: manifest[k] for k in IDENTITY_FIELDS}
    if "processor" in manifest:  # a vision-language model's image processor
        identity["processor"] = manifest["processor"]
    identity["data"] = {k: v for k, v in manifest["data"].items() if k != "files"}
    return sha256_json(identity)


def shard_name(index: int, total: int) -> str:
    return f"shard-{index:05d}-of-{total:05d}.parquet"


def shard_index(name: str, total: int) -> int | None:
    """The index of a well-formed shard name of a cache of ``total`` shards, else None."""
    match = _SHARD_NAME.match(name)
    if not match or int(match.group(2)) != total or int(match.group(1)) >= total:
        return None
    index = int(match.group(1))
    return index if shard_name(index, total) == name else None


def load_json_object(path: Path, what: str = "manifest", fix: str = REWRITE) -> dict[str, Any]:
    """A JSON object from ``path``, or a CacheError naming the file and ``fix``."""
    try:
        value = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"{path} is not a valid {what} (not JSON: {err}); {fix}") from None
    except RecursionError:
        raise CacheError(f"{path} is not a valid {what} (JSON nested too deeply); {fix}"
                         ) from None
    if not isinstance(value, dict):
        raise CacheError(f"{path} is not a valid {what}: expected a JSON object, got "
                         f"{type(value).__name__}; {fix}")
    return value


def check_manifest(manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    """Every field the tools read, with its type; shard entries and names."""
    for dotted, kind in _FIELDS.items():
        _check_type(_lookup(manifest, dotted), kind, dotted, path)
    if manifest["num_shards"] < 1:
        _bad(path, "num_shards", manifest["num_shards"], "a positive number of shards")
    for i, entry in enumerate(manifest["shards"]):
        where = f"shards[{i}]"
        _check_type(entry, dict, where, path)
        for name, kind in _SHARD_FIELDS.items():
            _check_type(entry.get(name), kind, f"{where}.{name}", path)
        if shard_index(entry["name"], manifest["num_shards"]) is None:
            _bad(path, f"{where}.name", entry["name"],
                 f"a shard file of this cache, e.g. {shard_name(0, manifest['num_shards'])!r}")
        if not _SHA256.match(entry["sha256"]):
            _bad(path, f"{where}.sha256", entry["sha256"], "64 hexadecimal digits")
        if entry["rows"] < 0 or entry["tokens"] < 0:
            _bad(path, f"{where}.rows", entry["rows"], "non-negative counts")
    for i, entry in enumerate(manifest["data"]["files"]):
        _check_type(entry, dict, f"data.files[{i}]", path)
        for name, kind in _FILE_FIELDS.items():
            _check_type(entry.get(name), kind, f"data.files[{i}].{name}", path)
    names = [e["name"] for e in manifest["shards"]]
    if len(set(names)) != len(names):
        _bad(path, "shards", sorted(n for n in names if names.count(n) > 1), "unique shard names")
    worker = manifest.get("worker")
    if worker is not None:
        _check_worker(worker, names, manifest["num_shards"], path)
    return manifest


def _check_worker(worker: Any, names: list[str], num_shards: int, path: Path) -> None:
    _check_type(worker, dict, "worker", path)
    for key in ("index", "num_workers"):
        _check_type(worker.get(key), int, f"worker.{key}", path)
    n, index = worker["num_workers"], worker["index"]
    if not 0 <= index < n:
        _bad(path, "worker.index", index, f"an index in [0, {n})")
    wrong = [name for name in names if (shard_index(name, num_shards) or 0) % n != index]
    if wrong:
        _bad(path, "shards", wrong, f"only shards s with s % {n} == {index} (this worker's)")


def _lookup(value: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


_MISSING = object()


def _check_type(value: Any, kind: type | tuple[type, ...], field: str, path: Path) -> None:
    if value is _MISSING or value is None:
        raise CacheError(f"{path}: field '{field}' is missing; not a kto-precompute manifest "
                         f"or a damaged one: {REWRITE}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        _bad(path, field, value, f"a value of type {name}")


def _bad(path: Path, field: str, value: Any, expected: str) -> None:
    text = repr(value)
    raise CacheError(f"{path}: field '{field}' is {text[:80]}: expected {expected}; {REWRITE}")
