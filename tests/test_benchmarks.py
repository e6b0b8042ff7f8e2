"""The benchmark scripts' own arithmetic: the parameter and FLOP count behind every
"of FLOP limit" column, the padding counts, the repetition statistics; and every
script parses its arguments (the benchmarks themselves are run by `make bench`, never
timed in tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from common import ModelShape, fmt, spread  # noqa: E402
from padding import padding  # noqa: E402


def test_model_shape_counts_the_parameters_of_the_model_it_builds(tokenizer):
    from train import demo

    shape = ModelShape(layers=2, hidden=128, vocab=3000)
    model = demo.build_model(tokenizer, layers=shape.layers, hidden=shape.hidden,
                             vocab_size=shape.vocab)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    assert shape.parameters() == {"total": total, "non_embedding": total - embedding}
    assert shape.flops_per_token() == 2 * (total - embedding)


def test_padding_counts_by_hand():
    # one batch: lengths 3 and 4, completions 1 and 3 tokens
    pairs = [([1, 2], [3]), ([1], [2, 3, 4])]
    assert padding(pairs, batch_tokens=100) == {
        "body_positions": 8, "real_tokens": 7,
        "tail_head_rows": 8,  # 2 rows x (max completion 3 + 1)
        "completion_tokens": 4}
    # a budget of 4 tokens puts each row in its own batch: no body padding
    assert padding(pairs, batch_tokens=4) == {
        "body_positions": 7, "real_tokens": 7, "tail_head_rows": 2 + 4,
        "completion_tokens": 4}


def test_spread_and_fmt():
    s = spread([3.0, 1.0, 2.0, 10.0], digits=1)
    assert s == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert fmt(s, 1) == "2.5 (1.0-10.0)"


def test_gpu_tables_count_the_qwen2_they_build(tmp_path):
    """The GPU tables' FLOPs per token: 2 x (parameters - embedding + the tied head)."""
    from gpu import build_qwen2, flops_per_token
    from gpu_tables import TINY
    from tiny import corpus
    from transformers import AutoModelForCausalLM

    model_dir = build_qwen2(tmp_path / "qwen2", corpus(), TINY)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embed  # tied, as Qwen2-0.5B
    assert flops_per_token(model_dir) == {"total": total, "flops_per_token": 2 * total}


@pytest.mark.parametrize("script", ["scoring.py", "train_step.py", "sweep.py", "scaling.py",
                                    "backends.py", "trl_kto.py", "padding.py",
                                    "gpu_tables.py", "server.py", "trl_vlm_kto.py",
                                    "vlm_rows.py", "vlm_train_step.py",
                                    "vlm_agreement.py"])
def test_benchmark_script_parses_its_arguments(script):
    out = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout


def test_model_shape_from_config_counts_a_saved_model_with_gqa_and_tied_embeddings(tmp_path):
    """SmolLM2's shape (grouped-query attention, head_dim 64, tied LM head) at toy size:
    the counts behind the real-model tables equal the saved model's parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=320, hidden_size=96, intermediate_size=160,
                         num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                         head_dim=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    shape = ModelShape.from_config(tmp_path / "m")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    total = sum(p.numel() for p in model.parameters())  # tied: the head is not counted twice
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    assert shape.parameters() == {"total": total, "non_embedding": total - embedding + head}
    assert shape.describe() == "m (2x96 Llama, vocabulary 320)"


def test_trl_vision_collator_sees_exactly_the_ids_of_the_rows_we_write(tmp_path):
    """vlm_rows renders rows so that TRL's own vision collator tokenizes them into our
    ids (BOS from the chat template, EOS added as text, every <image> expanded), and
    trl_vlm_kto's IdsCollator builds TRL's batch from those ids: same tensors as TRL's
    collator, pixel values included, and KL sequences = own prompt + KL completion."""
    import json

    from transformers import AutoProcessor
    from trl_vlm_kto import IdsCollator, check_batches, check_ids, load_rows
    from vlm_rows import add_kl, encode_row, kto_records

    from shared.tokenization import TokenizeOptions
    from tests.tiny_vision import TOKENS_PER_IMAGE, random_image, save_tiny_llava

    model = save_tiny_llava(tmp_path / "llava")
    for i in range(3):
        random_image(i, width=40 + 8 * i).save(tmp_path / f"{i}.png")
    ask = [{"role": "user", "content": "<image>What is this?"},
           {"role": "assistant", "content": "A picture of noise."}]
    conversations = [
        {"messages": ask, "images": ["0.png"]},
        {"messages": [*ask, {"role": "user", "content": "And this one?<image>"},
                      {"role": "assistant", "content": "More noise, in other colours."}],
         "images": ["1.png", "2.png"]},
        {"messages": [{"role": "user", "content": "Two: <image> and <image>."},
                      {"role": "assistant", "content": "Both grey."}],
         "images": ["2.png", "0.png"]}]
    records = kto_records(conversations, tmp_path)
    processor = AutoProcessor.from_pretrained(model)
    rows = add_kl([encode_row(r, i, processor, TokenizeOptions(max_length=1024))
                   for i, r in enumerate(records)], seed=42, max_length=1024)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    for row, record in zip(rows, records, strict=True):
        assert row["prompt_ids"][0] == tok.bos_token_id
        assert row["completion_ids"][-1] == tok.eos_token_id
        assert row["prompt_ids"].count(image_id) == TOKENS_PER_IMAGE * len(record["images"])
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = load_rows(tmp_path / "rows.jsonl")

    assert check_ids(dataset, processor) == {"rows": 6, "ids_differ": [],
                                             "completion_mask_differs": []}
    assert check_batches(dataset, processor, batch_size=3) == {"batches": 2, "differ": {}}
    batch = IdsCollator(processor.image_processor, tok.pad_token_id)([dataset[i] for i in range(3)])
    for i in range(3):
        row = dataset[i]
        kl = row["prompt_ids"] + row["kl_completion_ids"]
        n = len(kl)
        assert batch["KL_input_ids"][i, :n].tolist() == kl
        assert batch["KL_attention_mask"][i].sum().item() == n
        assert batch["KL_completion_mask"][i].tolist()[:n] == (
            [0] * len(row["prompt_ids"]) + [1] * len(row["kl_completion_ids"]))
