"""Fingerprints (SHA-256) that tie a cache to its reference model, tokenizer, data
and options. Stage 2 recomputes ``tokenizer_fingerprint`` for the policy tokenizer
and refuses a cache whose value differs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def sha256_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What decides the token ids: the tokenizer definition (vocabulary, merges,
    normalizer, added tokens), the special tokens and the chat template. Padding and
    truncation settings are left out: they do not change ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
    else:  # slow tokenizer: the vocabulary is what we can see
        definition = sorted(tokenizer.get_vocab().items())
    return sha256_json({
        "definition": definition,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
    })


def model_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 over config.json (parsed, so formatting does not matter) and the bytes
    of every weight file, in name order."""
    root = Path(model_dir)
    h = hashlib.sha256()
    config = root / "config.json"
    if config.is_file():
        h.update(sha256_json(json.loads(config.read_text())).encode())
    for f in sorted(p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()
