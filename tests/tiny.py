"""Tiny, deterministic, local model and tokenizer for tests (no network): the
builders of train.demo, with the tokenizer trained on fixed text that includes
the real demo files, so their tokenization is realistic."""

from __future__ import annotations

import json
from pathlib import Path

from train import demo

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def corpus() -> list[str]:
    texts = ["The quick brown fox jumps over the lazy dog.", "Hello, world!",
             "user assistant system", "0123456789"]
    for name in ("kto_en_demo.json", "dpo_en_demo.json"):
        path = SHARED_DATA / name
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8"))
    return texts


def save_tiny(directory: Path, seed: int = 0, **shape) -> Path:
    """Write tokenizer + model to ``directory`` (usable by transformers and vLLM)."""
    return demo.save_model(directory, corpus(), seed, **shape)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


if __name__ == "__main__":  # python tests/tiny.py DIR: the tiny model the README example uses
    import sys

    print(save_tiny(Path(sys.argv[1])))
