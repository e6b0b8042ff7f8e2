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
                                    "gpu_tables.py", "server.py"])
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
