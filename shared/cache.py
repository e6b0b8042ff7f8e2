"""The cache on disk (spec section 4): Parquet shards with a fixed schema, written
atomically, and a manifest that lists each shard with its rows, tokens and SHA-256.
``verify_cache`` is what `kto-precompute verify`, combine and kto-train call."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shared import CACHE_FORMAT_VERSION
from shared.errors import CacheError
from shared.files import atomic_write, atomic_write_text
from shared.fingerprint import sha256_file
from shared.manifest import REWRITE, cache_key_of, check_manifest, load_json_object, shard_name
from shared.vision import VISION_COLUMNS, VISION_FIELDS, check_vision_rows, images_digest

__all__ = ["MANIFEST", "SCHEMA", "ShardInfo", "shard_name", "verify_cache", "write_shard"]
MANIFEST = "manifest.json"
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source_index", pa.int64()),
    ("label", pa.bool_()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("completion_ids", pa.list_(pa.int32())),
    ("kl_completion_ids", pa.list_(pa.int32())),
    ("kl_partner", pa.string()),
    ("ref_logps", pa.float64()),
    ("ref_kl_logps", pa.float64()),
])
REFERENCE_COLUMNS = ("ref_logps", "ref_kl_logps")
# a vision-language model's cache: the same columns and each row's images (shared.vision)
VISION_SCHEMA = pa.schema([*SCHEMA, *VISION_FIELDS])
_META_KEY = b"kto_cache"
_HF_KEY = b"huggingface"  # datasets reads a shard's features (Image) from this key
REBUILD = "re-run kto-precompute with the same options on the same --output to rebuild it"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    rows: int
    tokens: int
    sha256: str


def table_tokens(table: pa.Table) -> int:
    """Tokens scored for a shard: prompt + completion and prompt + KL completion per row."""
    lengths = {c: pc.list_value_length(table[c]) for c in
               ("prompt_ids", "completion_ids", "kl_completion_ids")}
    total = pc.sum(lengths["prompt_ids"]).as_py() or 0
    return 2 * total + sum(pc.sum(lengths[c]).as_py() or 0
                           for c in ("completion_ids", "kl_completion_ids"))


def write_shard(directory: Path, name: str, table: pa.Table, cache_key: str) -> ShardInfo:
    """Write to a temporary name, fsync, then rename: a reader never sees half a shard.
    Every page carries a CRC, so a later run can tell a damaged shard from a good one
    even without the manifest."""
    vision = "images" in table.column_names
    meta = {_META_KEY: cache_key.encode()}
    if vision:
        meta[_HF_KEY] = json.dumps({"info": {"features": vision_features().to_dict()}}).encode()
    schema = VISION_SCHEMA if vision else SCHEMA
    table = table.select(schema.names).cast(schema).replace_schema_metadata(meta)
    final = directory / name
    atomic_write(final, lambda f: pq.write_table(table, f, compression="zstd",
                                                 write_page_checksum=True))
    return ShardInfo(name, table.num_rows, table_tokens(table), sha256_file(final))


def vision_features():
    """The vision schema as ``datasets`` features: images as a list of Image, so
    ``datasets.load_dataset(CACHE)`` gives decoded images."""
    import datasets

    features = datasets.Features.from_arrow_schema(SCHEMA)
    features["images"] = datasets.List(datasets.Image())
    features["image_sha256"] = datasets.List(datasets.Value("string"))
    features["image_offsets"] = datasets.List(datasets.Value("int32"))
    features["image_tokens"] = datasets.List(datasets.Value("int32"))
    return features


def shard_cache_key(path: Path) -> str | None:
    """The cache key a shard was written for (in its Parquet footer), None if unreadable."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError):
        return None
    key = meta.get(_META_KEY)
    return key.decode(errors="replace") if key is not None else ""


def read_shard(path: Path) -> pa.Table:
    """Every column, with each page's CRC checked; OSError/ArrowInvalid when damaged."""
    table = pq.read_table(path, page_checksum_verification=True)
    if not any(table.schema.equals(s, check_metadata=False) for s in (SCHEMA, VISION_SCHEMA)):
        raise pa.ArrowInvalid(f"schema {table.schema.names} is not the cache schema")
    return table


def non_finite_rows(table: pa.Table) -> dict[str, int]:
    """Column -> number of rows whose reference value is NaN or infinite."""
    out = {}
    for column in REFERENCE_COLUMNS:
        values = table[column].to_numpy(zero_copy_only=False)
        bad = int((~np.isfinite(values)).sum())
        if bad:
            out[column] = bad
    return out


def write_json(path: Path, value: dict[str, Any]) -> None:
    text = json.dumps(value, indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)


def read_manifest(directory: str | Path, name: str = MANIFEST) -> dict[str, Any]:
    path = Path(directory) / name
    if not path.is_file():
        raise CacheError(f"{path} not found: not a finished cache (a worker part has "
                         "manifest.worker-*.json; combine parts with `kto-precompute combine`)")
    manifest = load_json_object(path)
    if manifest.get("format_version") != CACHE_FORMAT_VERSION:
        raise CacheError(f"{path}: format_version {manifest.get('format_version')!r}, this "
                         f"version reads {CACHE_FORMAT_VERSION}; {REWRITE}")
    return check_manifest(manifest, path)


def verify_cache(directory: str | Path, checksums: bool = True) -> dict[str, Any]:
    """Check the manifest (structure, shard names inside the folder, a cache key that is
    the hash of its identity fields), then every shard: present, SHA-256 (with
    ``checksums``), schema, row count and the cache key in its footer; with ``checksums``
    also its label counts and that every reference value is finite. The totals must
    match the manifest's counts."""
    root = Path(directory)
    manifest = read_manifest(root)
    check_cache_files(root, manifest, checksums)
    return manifest


def check_cache_files(root: Path, manifest: dict[str, Any], checksums: bool = True) -> None:
    """verify_cache for a manifest in memory (combine checks its merged manifest before
    writing it, so a failed combine never replaces a good manifest.json)."""
    shards = manifest["shards"]
    if len(shards) != manifest["num_shards"]:
        raise CacheError(f"{root}: manifest lists {len(shards)} shards of "
                         f"{manifest['num_shards']}; {REWRITE}")
    key = cache_key_of(manifest)
    if key != manifest["cache_key"]:
        raise CacheError(f"{root}: the manifest's cache_key {manifest['cache_key'][:12]!r} is "
                         f"not the hash of its identity fields ({key[:12]!r}): the manifest "
                         f"was edited or damaged; {REBUILD}")
    if manifest["backend"]["name"] != manifest["preprocessing"].get("backend"):
        raise CacheError(f"{root}: backend.name {manifest['backend']['name']!r} is not the "
                         f"backend the cache key records "
                         f"({manifest['preprocessing'].get('backend')!r}); {REBUILD}")
    processor = manifest.get("processor")  # a vision-language model's cache
    found = [_verify_shard(root, entry, manifest["cache_key"], checksums, processor)
             for entry in shards]
    if processor is not None and checksums:
        _check_images_digest(root, manifest, [h for f in found for h in f["image_sha256"]])
    _check_totals(root, manifest, _sum_found(found) if checksums else None)


def _check_images_digest(root: Path, manifest: dict[str, Any], hashes: list[list[str]]) -> None:
    """The rows' image hashes, in shard order, against the digest the cache key covers."""
    if images_digest(hashes) != manifest["data"].get("images_sha256"):
        raise CacheError(f"{root}: the shards' images are not the ones the manifest's cache key "
                         f"records (data.images_sha256): images were replaced; {REBUILD}")


def _sum_found(found: list[dict[str, Any]]) -> dict[str, int]:
    """Desirable rows and the records the rows came from, over all shards."""
    sources = np.unique(np.concatenate([f["sources"] for f in found])) if found else []
    return {"desirable": sum(f["desirable"] for f in found), "records_with_rows": len(sources)}


def _check_totals(root: Path, manifest: dict[str, Any], read: dict[str, int] | None) -> None:
    """The manifest's counts against the shard entries and (``read``) the shards' rows:
    every record became rows or was counted invalid, and the files' records add up."""
    counts, shards = manifest["counts"], manifest["shards"]
    found = {"rows": sum(s["rows"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
             "invalid": sum(counts["invalid_by_reason"].values()),
             "records (data.files)": sum(f["records"] for f in manifest["data"]["files"])}
    expected = {"rows": counts["rows"], "tokens": manifest["tokens"], "invalid": counts["invalid"],
                "records (data.files)": counts["records"]}
    if read is not None:
        found.update(desirable=read["desirable"],
                     undesirable=found["rows"] - read["desirable"],
                     records=read["records_with_rows"] + counts["invalid"])
        expected.update(desirable=counts["desirable"], undesirable=counts["undesirable"],
                        records=counts["records"])
    wrong = [f"{k}: shards hold {found[k]}, manifest says {expected[k]}"
             for k in found if found[k] != expected[k]]
    if wrong:
        raise CacheError(f"{root}: the shards and counts do not match the manifest "
                         f"({'; '.join(wrong)}); {REBUILD}")


def _verify_shard(root: Path, entry: dict[str, Any], cache_key: str, checksums: bool,
                  processor: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checks one shard; with ``checksums`` returns its number of desirable rows and the
    source records of its rows (its token count is recomputed too)."""
    name, path = entry["name"], root / entry["name"]
    if not path.is_file():
        raise CacheError(f"shard {name} is missing from {root}; {REBUILD}")
    if checksums and sha256_file(path) != entry["sha256"]:
        raise CacheError(f"shard {name} is damaged: its SHA-256 does not match the "
                         f"manifest; {REBUILD}")
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowInvalid, OSError) as err:
        raise CacheError(f"shard {name} cannot be read as Parquet ({err}); {REBUILD}") from None
    vision = processor is not None
    wrong = [f.name for f in (VISION_SCHEMA if vision else SCHEMA)
             if schema.get_field_index(f.name) < 0 or schema.field(f.name).type != f.type]
    if wrong:
        raise CacheError(f"shard {name}: columns missing or of the wrong type: {wrong}; {REBUILD}")
    if not vision and schema.get_field_index("images") >= 0:
        raise CacheError(f"shard {name} holds images, but the manifest records no image "
                         f"processor (no 'processor' section): the manifest was edited or "
                         f"belongs to another cache; {REBUILD}")
    if meta.num_rows != entry["rows"]:
        raise CacheError(f"shard {name} holds {meta.num_rows} rows, manifest says "
                         f"{entry['rows']}; {REBUILD}")
    key = (meta.metadata or {}).get(_META_KEY, b"").decode(errors="replace")
    if key != cache_key:
        raise CacheError(f"shard {name} belongs to another cache (its cache key {key[:12]!r}, "
                         f"the manifest's {cache_key[:12]!r}); {REBUILD}")
    if not checksums:
        return {}
    table = pq.read_table(path, columns=["label", "source_index", "prompt_ids",
                                         "completion_ids", "kl_completion_ids",
                                         *REFERENCE_COLUMNS])
    bad = non_finite_rows(table)
    if bad:
        raise CacheError(f"shard {name} holds non-finite reference log-probs ({bad} rows): "
                         f"damaged or edited; {REBUILD}")
    hashes = None
    if vision:
        images = pq.read_table(path, columns=["prompt_ids", *VISION_COLUMNS])
        problem = check_vision_rows(images, processor["image_token_id"])
        if problem:
            raise CacheError(f"shard {name}: {problem}: damaged or edited; {REBUILD}")
        hashes = images["image_sha256"].to_pylist()
    tokens = table_tokens(table)
    if tokens != entry["tokens"]:
        raise CacheError(f"shard {name} holds {tokens} tokens, manifest says {entry['tokens']}; "
                         f"{REBUILD}")
    return {"desirable": int(pc.sum(table["label"]).as_py() or 0),
            "sources": table["source_index"].to_numpy(), "image_sha256": hashes}


def shard_infos(entries: list[ShardInfo]) -> list[dict[str, Any]]:
    return [asdict(e) for e in sorted(entries, key=lambda e: e.name)]
