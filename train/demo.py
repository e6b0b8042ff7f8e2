"""The main job on a fresh machine, with nothing to download: build a tiny random
Llama and a small preference dataset, run kto-precompute, then kto-train with a
held-out evaluation, and print what changed.

    python -m train.demo OUTPUT_DIR        (or: make demo)

The dataset has one unambiguous desirable behaviour (a polite reply is desirable, a
rude one is not), so the held-out rewards/margins should rise from 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
POLITE, RUDE = "Thank you, happy to help!", "Go away, not my problem."


def build_tokenizer(corpus: list[str], vocab_size: int = 1024):
    """Byte-level BPE trained on ``corpus`` (deterministic), with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64,
                vocab_size: int | None = None):
    """A random Llama with head_dim 32 (vLLM's CPU attention rejects 16). ``vocab_size``
    may exceed the tokenizer's: extra rows cost compute like a real vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden,
        intermediate_size=2 * hidden if hidden == 64 else 4 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32, max_position_embeddings=2048,
        initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_model(directory: Path, corpus: list[str], seed: int = 0, **shape) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus)
    build_model(tokenizer, seed, **shape).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def polite_records(prompts: range) -> list[dict]:
    out = []
    for i in prompts:
        prompt = [{"role": "user", "content": f"Customer {i} asks about order {i * 7 % 100}."}]
        out.append({"prompt": prompt, "completion": [{"role": "assistant", "content": POLITE}],
                    "label": True})
        out.append({"prompt": prompt, "completion": [{"role": "assistant", "content": RUDE}],
                    "label": False})
    return out


def _run(cmd: list[str]) -> dict:
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout)


def main(out: Path) -> None:
    train, held_out = polite_records(range(0, 96)), polite_records(range(1000, 1032))
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("eval", held_out)):
        (out / "data" / f"{name}.json").write_text(json.dumps(records))
    corpus = [json.dumps(train + held_out)]
    model = save_model(out / "tiny-model", corpus)
    bin_dir = Path(sys.executable).parent
    for name in ("train", "eval"):
        _run([str(bin_dir / "kto-precompute"), "--model", str(model), "--data",
              str(out / "data" / f"{name}.json"), "--output", str(out / f"cache-{name}"),
              "--overwrite"])
    final = _run([str(bin_dir / "kto-train"), "--model", str(model), "--cache",
                  str(out / "cache-train"), "--eval-cache", str(out / "cache-eval"),
                  "--output", str(out / "policy"), "--learning-rate", "1e-3",
                  "--per-device-train-batch-size", "8", "--num-train-epochs", "1",
                  "--logging-steps", "4", "--eval-steps", "12"])
    evals = [json.loads(line) for line in (out / "policy" / "metrics.jsonl").read_text()
             .splitlines() if "eval_loss" in line]
    print(f"\ntrained {final['step']} steps; held-out (64 rows) rewards/margins: "
          f"{evals[0]['eval_rewards/margins']:.4f} at step 0 -> "
          f"{evals[-1]['eval_rewards/margins']:.4f} at step {evals[-1]['step']}; "
          f"eval loss {evals[0]['eval_loss']:.4f} -> {evals[-1]['eval_loss']:.4f}")
    print(f"policy saved in {out / 'policy'}; metrics in {out / 'policy' / 'metrics.jsonl'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
