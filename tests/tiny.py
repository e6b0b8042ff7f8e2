"""Tiny, deterministic, local model and tokenizer for tests (no network): the
builders of train.demo, with the tokenizer trained on the project's own fixed English
text (tests/data/corpus.txt: assistant-style questions and answers, lists, code), so
chat and English data tokenize realistically and identically on every machine."""

from __future__ import annotations

import json
from pathlib import Path

from train import demo

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"


def corpus() -> list[str]:
    """The tests' tokenizer corpus: one fixed file of the repository, nothing else."""
    return [CORPUS.read_text(encoding="utf-8")]


def save_tiny(directory: Path, seed: int = 0, **shape) -> Path:
    """Write tokenizer + model to ``directory`` (usable by transformers and vLLM)."""
    return demo.save_model(directory, corpus(), seed, **shape)


def save_tiny_moe(directory: Path, seed: int = 0, aux_coef: float = 0.02) -> Path:
    """A tiny random Mixtral (4 experts, 2 per token) with the tests' tokenizer; its
    config declares ``router_aux_loss_coef`` (not the class default, to tell them apart)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    tokenizer = demo.build_tokenizer(corpus())
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, router_aux_loss_coef=aux_coef, max_position_embeddings=2048,
        initializer_range=0.2, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    MixtralForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


if __name__ == "__main__":  # python tests/tiny.py DIR: the tiny model the README example uses
    import sys

    print(save_tiny(Path(sys.argv[1])))
