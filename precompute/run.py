"""kto-precompute's main job: prepare rows, score this worker's shards (reusing
complete ones from an earlier run), write the manifest, print a summary."""

from __future__ import annotations

import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from precompute.config import PrecomputeConfig
from precompute.identity import (
    cache_identity,
    check_model_dir,
    library_versions,
    load_tokenizer,
    resolve_model_dir,
)
from precompute.prepare import Prepared, prepare
from precompute.prepare_vision import VisionEncoder
from precompute.reuse import recorded_shards, reusable_shard
from precompute.scoring import Scorer, make_scorer, make_server_scorer, resolve_backend
from precompute.shards import pair_shard, score_shard, shard_bounds, worker_shards
from shared import CACHE_FORMAT_VERSION
from shared.cache import (
    MANIFEST,
    ShardInfo,
    shard_infos,
    shard_name,
    verify_cache,
    write_json,
    write_shard,
)
from shared.card import is_card, write_card
from shared.errors import CacheError, ConfigError, KtoError, writing
from shared.files import refuse_links_in
from shared.fingerprint import sha256_json
from shared.formats import parse_column_map
from shared.lock import FolderLock
from shared.manifest import check_manifest, load_json_object
from shared.sources import check_model_source, removed_if_refused
from shared.vision import (
    check_family,
    images_digest,
    load_processor,
    processor_record,
    vision_spec,
)

log = logging.getLogger(__name__)
_SHARD = re.compile(r"^shard-(\d{5})-of-\d{5}\.parquet$")


def part_manifest_name(num_workers: int, worker_index: int) -> str:
    if num_workers == 1:
        return MANIFEST
    return f"manifest.worker-{worker_index:05d}-of-{num_workers:05d}.json"


def run(config: PrecomputeConfig, scorer: Scorer | None = None) -> dict[str, Any]:
    """Build (or resume) this worker's part of the cache. ``scorer``: an engine already
    started by the caller (kept open), e.g. to score several datasets with one vLLM."""
    started = time.monotonic()
    check_model_source(config.model)
    if config.tokenizer:
        check_model_source(config.tokenizer, "--tokenizer")
    out = Path(config.output)
    check_output_outside_inputs(out, config.data)
    with removed_if_refused(out):
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
        refuse_links_in(out, "the cache")
        lock = out / f".kto-precompute-worker-{config.worker_index:05d}.lock"
        with FolderLock(lock, f"--output {out} (worker {config.worker_index})"):
            return _run_locked(config, scorer, out, started)


def check_output_outside_inputs(out: Path, data: tuple[str, ...]) -> None:
    """A cache written inside a --data folder would become part of its own input (the
    data fingerprint covers every file of the folder): refused before any work."""
    target = out.resolve()
    for path in data:
        folder = Path(path).resolve()
        if folder.is_dir() and (target == folder or folder in target.parents):
            raise ConfigError(f"--output {out} is inside --data {path}: the cache's files would "
                              "become part of its own input, so every rerun would see other "
                              "data; choose an --output outside the data folder")


def _run_locked(config: PrecomputeConfig, scorer: Scorer | None, out: Path,
                started: float) -> dict[str, Any]:
    model_dir = None
    if config.backend != "server":  # a server's client holds only the tokenizer
        model_dir = resolve_model_dir(config.model)
        check_model_dir(model_dir, config.model)  # a config and weights: a second
    tokenizer = load_tokenizer(config.tokenizer_path)
    backend = resolve_backend(config.backend)
    vision = vision_encoder(config.tokenizer_path, config.model)
    if vision is None and model_dir is not None:
        check_text_model(model_dir, config.model, config.tokenizer_path)
    if vision is not None and backend == "server":
        raise ConfigError(f"--model {config.model} is a vision-language model: --backend server "
                          "does not score images yet; use --backend vllm or hf")
    if backend != "server" or scorer is not None:
        return _run_with(config, backend, tokenizer, scorer, out, started, model_dir, vision)
    if config.dtype != PrecomputeConfig.dtype:
        log.warning("--dtype %s does not apply to --backend server: the server's own --dtype "
                    "decides (the probe's log-probs record its effect)", config.dtype)
    # the server is probed before anything else: what it serves is part of the cache key
    server = make_server_scorer(config.server_url, tokenizer, served_model=config.server_model,
                                max_concurrent_requests=config.max_concurrent_requests,
                                prompts_per_request=config.prompts_per_request,
                                timeout=config.server_timeout)
    try:
        return _run_with(config, backend, tokenizer, server, out, started, model_dir)
    finally:
        server.close()


def check_text_model(model_dir: Path | str, model: str, tokenizer_path: str) -> None:
    """A vision-language --model whose --tokenizer folder has no image processor would be
    loaded as a text model and fail inside transformers: refused, naming what is missing."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as err:  # a type only the backend knows: its call
        log.debug("no transformers config for %s (%s)", model_dir, err)
        return
    if hasattr(config, "vision_config"):
        raise ConfigError(f"--model {model} is a vision-language model ({config.model_type}), "
                          f"but {tokenizer_path} has no image processor (no "
                          "processor_config.json / preprocessor_config.json): save the "
                          "model's processor beside it, or pass --tokenizer a folder that "
                          "holds it")


def vision_encoder(path: str, model: str) -> VisionEncoder | None:
    """The processor of a vision-language model (None for a text model): ``path`` holds
    the processor (the tokenizer's folder), ``model`` the config."""
    processor = load_processor(path)
    if processor is None:
        return None
    spec = vision_spec(processor, path)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    if not hasattr(config, "vision_config"):
        raise ConfigError(f"--tokenizer {path} has an image processor, but --model {model} is a "
                          f"text model ({config.model_type}, no vision tower): give the "
                          "vision-language model's own folder as --tokenizer, or a text "
                          "model's tokenizer")
    check_family(config, model)
    log.info("vision-language model: image token %r, image processor %s", spec.image_token,
             spec.settings["image_processor_class"])
    return VisionEncoder(processor, spec)


def _vision_identity(vision: VisionEncoder | None, path: str,
                     rows: pa.Table) -> dict[str, Any] | None:
    if vision is None:
        return None
    return {"processor": processor_record(vision.spec, path),
            "images_sha256": images_digest(rows["image_sha256"].to_pylist())}


def _run_with(config: PrecomputeConfig, backend: str, tokenizer: Any, scorer: Scorer | None,
              out: Path, started: float, model_dir: Path | None,
              vision: VisionEncoder | None = None) -> dict[str, Any]:
    served = getattr(scorer, "served", None) if backend == "server" else None
    # the data are read and checked before the weights are hashed (a minute for a large
    # model), so a misspelled field is reported at once
    with tempfile.TemporaryDirectory(prefix="kto-precompute-", ignore_cleanup_errors=True) as tmp:
        spill = Path(tmp) / "rows.arrow"
        with writing(spill, where="TMPDIR"):
            prepared = prepare(config.data, tokenizer, config.tokenize, config.format,
                               parse_column_map(config.columns), config.skip_invalid, spill,
                               config.subset, vision)
        identity = cache_identity(config, backend, tokenizer, model_dir,
                                  served.identity() if served is not None else None,
                                  _vision_identity(vision, config.tokenizer_path, prepared.rows))
        cache_key = sha256_json(identity)
        _claim_output(out, cache_key, config, identity)
    # the rows stay memory-mapped: POSIX keeps an unlinked file's pages while a mapping
    # holds them, so a kill -9 while scoring leaves nothing in $TMPDIR
    if served is not None:
        scorer.check_length(longest_sequence(config, prepared.rows))
    bounds = shard_bounds(prepared.rows.num_rows, config.shard_size)
    mine = worker_shards(len(bounds), config.num_workers, config.worker_index)
    infos, scored = _write_shards(config, backend, prepared.rows, bounds, mine, cache_key,
                                  out, scorer, vision)
    manifest = build_manifest(identity, cache_key, prepared, len(bounds), infos, backend, config,
                              served.record() if served is not None else None)
    write_json(out / part_manifest_name(config.num_workers, config.worker_index), manifest)
    if config.num_workers == 1:
        verify_cache(out)
        write_card(out, manifest)  # a finished cache; worker parts get theirs from combine
    return _summary(manifest, scored, time.monotonic() - started, out, config)


def _claim_output(out: Path, cache_key: str, config: PrecomputeConfig,
                  identity: dict[str, Any]) -> None:
    """Refuse to mix caches, naming the settings that differ. --overwrite removes only what
    this worker would write (its shards, its part manifest, the combined manifest): workers
    may share a directory."""
    if config.overwrite:
        for f in out.iterdir():
            if _owned_by(f.name, config.num_workers, config.worker_index) or is_card(f):
                f.unlink()
        return
    manifest = out / MANIFEST
    if not manifest.is_file():
        return
    try:
        earlier = check_manifest(load_json_object(manifest), manifest)
    except KtoError as err:
        raise CacheError(f"{err}; or pass --overwrite to rebuild the cache in {out}") from None
    if earlier["cache_key"] != cache_key:
        changed = "; ".join(identity_differences(earlier, identity)) or "the cache key"
        raise CacheError(f"{out} already holds a cache made with other settings ({changed}); "
                         "use a new --output directory or pass --overwrite")


def identity_differences(earlier: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``section.key: old then, new now`` for every identity value that changed (the
    manifest holds more than the identity: only the identity's keys are compared)."""
    found = []
    for section, values in now.items():
        before = earlier.get(section)
        if not isinstance(values, dict) or not isinstance(before, dict):
            if before != values:
                found.append(f"{section}: {before!r} then, {values!r} now")
            continue
        for key, value in values.items():
            if before.get(key) != value:
                found.append(f"{section}.{key}: {_short(before.get(key))} then, "
                             f"{_short(value)} now")
    return found


def _short(value: Any) -> str:
    """Fingerprints shortened to 12 characters, as kto-train prints them."""
    if isinstance(value, str) and len(value) == 64:
        return value[:12]
    return repr(value)


def _owned_by(name: str, num_workers: int, worker_index: int) -> bool:
    shard = _SHARD.match(name)
    if shard:
        return int(shard.group(1)) % num_workers == worker_index
    return name in (MANIFEST, part_manifest_name(num_workers, worker_index))


def _write_shards(config: PrecomputeConfig, backend: str, rows: pa.Table,
                  bounds: list[tuple[int, int]], mine: list[int], cache_key: str,
                  out: Path, scorer: Scorer | None, vision: VisionEncoder | None = None
                  ) -> tuple[list[ShardInfo], dict[str, float]]:
    infos = _reusable(config, rows, bounds, mine, cache_key, out)
    todo = [s for s in mine if s not in infos]
    if infos:
        log.info("reusing %d complete shard(s) from an earlier run", len(infos))
    scored = {"rows": 0, "tokens": 0, "seconds": 0.0}
    if todo:
        own = scorer is None
        scorer = scorer or _start_scorer(config, backend, rows, vision)
        try:
            _score_todo(config, rows, bounds, todo, cache_key, out, scorer, infos, scored)
        finally:
            if own:
                scorer.close()
    return [infos[s] for s in mine], scored


def _reusable(config: PrecomputeConfig, rows: pa.Table, bounds: list[tuple[int, int]],
              mine: list[int], cache_key: str, out: Path) -> dict[int, ShardInfo]:
    """This worker's intact shards from an earlier run; damaged ones are removed."""
    manifests = (MANIFEST, part_manifest_name(config.num_workers, config.worker_index))
    recorded = recorded_shards(out, manifests, cache_key)
    infos: dict[int, ShardInfo] = {}
    for s in mine:
        name = shard_name(s, len(bounds))
        for stale in out.glob(f".{name}.tmp-*"):  # a killed run's
            stale.unlink()
        if not (out / name).is_file():
            continue
        start, stop = bounds[s]
        expected = pair_shard(rows.slice(start, stop - start), s, config.seed,
                              config.tokenize.max_length)
        info = reusable_shard(out / name, cache_key, expected, recorded.get(name),
                              folder_is_ours=bool(recorded))
        if info is not None:
            infos[s] = info
    return infos


def longest_sequence(config: PrecomputeConfig, rows: pa.Table) -> int:
    lengths = [pc.max(pc.list_value_length(rows[c])).as_py()
               for c in ("prompt_ids", "completion_ids")]
    return min(config.tokenize.max_length, lengths[0] + lengths[1])


def _start_scorer(config: PrecomputeConfig, backend: str, rows: pa.Table,
                  vision: VisionEncoder | None = None):
    longest = longest_sequence(config, rows)
    check_position_limit(config.model, longest)
    log.info("starting the %s scorer on %s (%s)", backend, config.model, config.dtype)
    if vision is not None:
        from precompute.scoring.vision import make_vision_scorer

        most = pc.max(pc.list_value_length(rows["image_sha256"])).as_py() or 0
        return make_vision_scorer(backend, config, vision, longest, most)
    return make_scorer(backend, config.model, config.dtype, batch_tokens=config.batch_tokens,
                       max_model_len=longest + 1,  # vLLM scores at most max_model_len - 1
                       tensor_parallel_size=config.tensor_parallel_size,
                       gpu_memory_utilization=config.gpu_memory_utilization,
                       cpu_kv_cache_gib=config.cpu_kv_cache_gib, seed=config.seed,
                       max_num_batched_tokens=config.max_num_batched_tokens)


def check_position_limit(model: str, longest: int) -> None:
    """Both backends need every sequence within the model's positions (vLLM refuses,
    transformers would silently extrapolate)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and longest + 1 > limit:
        raise ConfigError(f"sequences reach {longest} tokens but {model} has "
                          f"{limit} positions; lower --max-length to {limit - 1} or less")


def _score_todo(config, rows, bounds, todo, cache_key, out, scorer, infos, scored) -> None:
    total = sum(bounds[s][1] - bounds[s][0] for s in todo)
    with tqdm(total=total, desc="score", unit="row", mininterval=1.0) as bar:
        for s in todo:
            start, stop = bounds[s]
            t0 = time.monotonic()
            table = score_shard(rows.slice(start, stop - start), s, config.seed,
                                config.tokenize.max_length, scorer)
            infos[s] = write_shard(out, shard_name(s, len(bounds)), table, cache_key)
            scored["seconds"] += time.monotonic() - t0
            scored["rows"] += stop - start
            scored["tokens"] += infos[s].tokens
            bar.update(stop - start)
            bar.set_postfix_str(f"{scored['tokens'] / scored['seconds']:.0f} tok/s")


def build_manifest(identity: dict[str, Any], cache_key: str, prepared: Prepared,
                   num_shards: int, infos: list[ShardInfo], backend: str,
                   config: PrecomputeConfig, server: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    labels = prepared.rows["label"]
    desirable = pc.sum(labels).as_py() or 0
    manifest = {
        "format_version": CACHE_FORMAT_VERSION,
        "cache_key": cache_key,
        **identity,
        "backend": {"name": backend, "versions": library_versions(backend),
                    **({"server": server} if server is not None else {})},
        "data": {**identity["data"], "files": prepared.files},
        "counts": {
            "records": prepared.records,
            "rows": prepared.rows.num_rows,
            "desirable": desirable,
            "undesirable": prepared.rows.num_rows - desirable,
            "invalid": sum(prepared.invalid.counts.values()),
            "invalid_by_reason": dict(sorted(prepared.invalid.counts.items())),
            "invalid_samples": dict(sorted(prepared.invalid.samples.items())),
        },
        "tokens": sum(i.tokens for i in infos),
        "num_shards": num_shards,
        "shards": shard_infos(infos),
    }
    if "image_sha256" in prepared.rows.column_names:
        manifest["images"] = image_counts(prepared.rows)
    if config.num_workers > 1:
        manifest["worker"] = {"index": config.worker_index, "num_workers": config.num_workers}
    return manifest


def image_counts(rows: pa.Table) -> dict[str, int]:
    """Images in the rows, distinct ones (by SHA-256) and their bytes."""
    hashes = pc.list_flatten(rows["image_sha256"])
    sizes = pc.binary_length(pc.struct_field(pc.list_flatten(rows["images"]), "bytes"))
    distinct = {h: n for h, n in zip(hashes.to_pylist(), sizes.to_pylist(), strict=True)}
    return {"count": len(hashes), "distinct": len(distinct),
            "distinct_bytes": sum(distinct.values())}


def _summary(manifest: dict[str, Any], scored: dict[str, float], seconds: float, out: Path,
             config: PrecomputeConfig) -> dict[str, Any]:
    rate = scored["seconds"]
    return _with_gpu_memory({
        "output": str(out),
        "manifest": part_manifest_name(config.num_workers, config.worker_index),
        "backend": manifest["backend"]["name"],
        "records": manifest["counts"]["records"],
        "rows": manifest["counts"]["rows"],
        "desirable": manifest["counts"]["desirable"],
        "undesirable": manifest["counts"]["undesirable"],
        "invalid_by_reason": manifest["counts"]["invalid_by_reason"],
        "shards_written": len(manifest["shards"]),
        "rows_scored_now": scored["rows"],
        "tokens_scored_now": scored["tokens"],
        "scoring_seconds": round(scored["seconds"], 2),
        "total_seconds": round(seconds, 2),
        # null when nothing was scored now (every shard reused): JSON has no NaN
        "rows_per_second": round(scored["rows"] / rate, 1) if rate else None,
        "tokens_per_second": round(scored["tokens"] / rate, 1) if rate else None,
    })


def _with_gpu_memory(summary: dict[str, Any]) -> dict[str, Any]:
    """Peak GPU memory of this process, where it used CUDA (the hf scorer; vLLM's engine
    runs in its own process, and asking here must not initialize CUDA)."""
    import torch

    if torch.cuda.is_initialized():
        summary["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return summary
