"""Tiny, deterministic, local model and tokenizer for tests (no network):
a byte-level BPE trained on fixed text, a ChatML-style chat template, and a
2-layer Llama at hidden size 64 with 2 heads (head_dim 32: vLLM's CPU attention
does not support head_dim 16)."""

from __future__ import annotations

import json
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def corpus() -> list[str]:
    texts = ["The quick brown fox jumps over the lazy dog.", "Hello, world!",
             "user assistant system", "0123456789"]
    for name in ("kto_en_demo.json", "dpo_en_demo.json"):
        path = SHARED_DATA / name
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8"))
    return texts


def build_tokenizer(vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64,
                vocab_size: int | None = None):
    """A random Llama; head_dim is always 32. ``vocab_size`` may exceed the tokenizer's
    (the extra rows cost compute as a real vocabulary would, and are never targets)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden,
        intermediate_size=2 * hidden if hidden == 64 else 4 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        max_position_embeddings=2048, initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_tiny(directory: Path, seed: int = 0, **shape) -> Path:
    """Write tokenizer + model to ``directory`` (usable by transformers and vLLM)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed, **shape).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


if __name__ == "__main__":  # python tests/tiny.py DIR: the tiny model the README example uses
    import sys

    print(save_tiny(Path(sys.argv[1])))
